"""Fewer-scale students (DESIGN §2.5): a generator on a shorter schedule, started from and trained by a frozen teacher.

A Markov generator predicts each scale from the state before it alone, so a student may jump between fewer states of
the same chain: schedule S = (s_0, …, s_{J−1}), a subset of the teacher's T = (t_0, …, t_{K−1}) ending at its last
scale, with the teacher's blocks and, per scale, the level / position embeddings of the teacher's scale of that size
(``take_scales``). Its targets are the chain M_S(j)·x_0 of a clean latent x_0 on S (``quantizer.quantize(x_0, S)``):

    targets: data     x_0 = encoder(image)                                    (fine-tuning on real data)
    targets: teacher  x_0 = f̂_T = tokens_to_fhat(teacher sample on T)        (sequence-level distillation)

the teacher sampling with ``teacher_sampling``, labels from the batch, per-sample seeds from the step's generator. With
``soft_weight`` λ > 0 the loss adds λ · Σ_l (1/L) KL(p_T ‖ p_S) (p_T: the teacher's plain softmax on M_T·x_0) over the
scales whose input *is* a teacher state. Student scale j sees area_down(M_S(j−1)·x_0, s_j), the teacher's scale i of
the same size area_down(M_T(i−1)·x_0, t_i); re-quantization makes the same steps on both schedules as long as they
agree, so the inputs (and targets) are equal iff s_0..s_j = t_0..t_j — the common prefix (1×1 and 2×2 of 1-2-4-8
under 1-2-3-4-6-8, only 1×1 of 1-3-6-8).

The teacher is loaded at setup (with the student's tokenizer, whose fingerprint must be the teacher's), kept out of the
registered submodules — so in no checkpoint, optimizer, EMA copy or DDP/FSDP wrapper — and moved with the module
(``_apply``); its path and fingerprint are recorded, and a resumed run whose ``teacher_ckpt`` now holds other weights is
refused. ``srdd sample`` loads a student like any generator. Validation uses real data re-quantized onto S.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from srdd_lightning.loading import fingerprint, load_generator, read_checkpoint, resolve_checkpoint
from srdd_lightning.models.scales import num_tokens, subset_indices
from srdd_lightning.models.transformer import VARTransformer
from srdd_lightning.sampling.config import SamplingConfig
from srdd_lightning.stages.generator import GeneratorArch, GeneratorOptim, SRDDModule, _typed, token_cross_entropy

TEACHER_OPTION = "model.init_args.teacher_ckpt"
CKPT_TEACHER_KEY = "srdd_teacher"  # where a student checkpoint records its teacher (path, fingerprint)
BEST_ROW_SAMPLING = SamplingConfig(cfg=0.0, top_k=900, top_p=0.96)  # the digits table's best row (no refinement)


def coincident_scales(student: tuple[int, ...], teacher: tuple[int, ...]) -> int:
    """How many leading student scales have exactly a teacher state as input: the schedules' common prefix."""
    return next((i for i, (s, t) in enumerate(zip(student, teacher)) if s != t), min(len(student), len(teacher)))


class StudentModule(SRDDModule):
    """A fewer-scale generator started from a frozen teacher and trained on its own schedule (see the module docstring).

    Args:
        tokenizer_ckpt: The frozen tokenizer (the teacher's: its fingerprint is checked).
        teacher_ckpt: The teacher: a generator run folder or checkpoint (``runs/digits/srdd``). Only its path and
            fingerprint are stored in the student.
        schedule: The student's scales, a subset of the teacher's ending at its last scale, e.g. ``[1, 2, 4, 8]``.
        targets: ``data``: real images re-quantized onto the schedule (fine-tuning); ``teacher``: the teacher's
            samples re-quantized onto it (sequence-level distillation).
        teacher_sampling: How the teacher samples for ``targets: teacher`` (its own schedule unless ``schedule`` is
            set); default: the best digits table row (cfg 0, top-k 900, top-p 0.96, no refinement).
        soft_weight: λ of the KL to the teacher's distribution at the scales whose state is a teacher state (the
            common prefix of the schedules); 0: off.
        init_from: ``teacher``: start from the teacher's weights; null: VAR's random init; or a path (as for SRDDModule).
        teacher_ema: Use the teacher's EMA weights.
        generator: Generator preset; null: the teacher's (also for ``architecture`` and ``attn``).
        architecture: Changes to the preset; null: the teacher's.
        attn: Attention mask; null: the teacher's.
        num_classes, image_size, cond_drop, label_smoothing, optim, tokenizer_ema, init_from_ignore: as SRDDModule.
    """

    # Training needs the latents x_0 (re-quantized on the student's schedule, and the teacher's KL), not tokens.
    trains_from_tokens = False

    @staticmethod
    def check_init_args(init_args: dict) -> None:
        """Called by ``srdd`` before building the module: the tokenizer and the teacher must exist."""
        resolve_checkpoint(init_args["teacher_ckpt"], TEACHER_OPTION)
        SRDDModule.check_init_args({**init_args, "init_from": None if init_args.get("init_from") == "teacher"
                                    else init_args.get("init_from")})  # fmt: skip

    def __init__(self, tokenizer_ckpt: str, teacher_ckpt: str, schedule: list[int],
                 targets: Literal["data", "teacher"] = "teacher", teacher_sampling: SamplingConfig = BEST_ROW_SAMPLING,
                 soft_weight: float = 0.0, init_from: str | None = "teacher", teacher_ema: bool = True,
                 generator: str | None = None, architecture: GeneratorArch | None = None,
                 attn: Literal["markov", "causal", "markov_prev"] | None = None, num_classes: int | None = None,
                 image_size: int | None = None, cond_drop: float = 0.1, label_smoothing: float = 0.0,
                 optim: GeneratorOptim = GeneratorOptim(), tokenizer_ema: bool = True,
                 init_from_ignore: list[str] | None = None):
        if soft_weight < 0:
            raise ValueError(f"model.init_args.soft_weight={soft_weight} must be >= 0")
        if None in (generator, architecture, attn):  # the teacher's architecture (a checkpoint records it resolved)
            file, ckpt = read_checkpoint(teacher_ckpt, TEACHER_OPTION)
            thp = ckpt.get("hyper_parameters") or {} if isinstance(ckpt, dict) else {}
            if "tokenizer_ckpt" not in thp:
                raise ValueError(f"{file} ({TEACHER_OPTION}) is not a generator (SRDDModule) checkpoint")
            generator = generator or thp.get("generator", "tiny")
            architecture = architecture if architecture is not None else thp.get("architecture")
            attn = attn or thp.get("attn", "markov")
        teacher_sampling = _typed(SamplingConfig, teacher_sampling)
        super().__init__(tokenizer_ckpt, generator=generator, architecture=_typed(GeneratorArch, architecture),
                         attn=attn, num_classes=num_classes, image_size=image_size, schedule=schedule,
                         cond_drop=cond_drop, label_smoothing=label_smoothing, optim=optim,
                         tokenizer_ema=tokenizer_ema, init_from=init_from, init_from_ignore=init_from_ignore)  # fmt: skip
        # resolved values, so a reload builds the same student without reading the teacher
        self.hparams.update(generator=generator, attn=attn, teacher_sampling=teacher_sampling.to_dict())
        self.teacher_sampling = teacher_sampling
        self._teacher: VARTransformer | None = None  # loaded at setup, never registered (see the module docstring)
        self.teacher_info: dict[str, Any] | None = None
        self._kl: torch.Tensor | None = None

    # ---- the teacher -------------------------------------------------------------------------------

    @property
    def teacher(self) -> VARTransformer:
        if self._teacher is None:
            self.load_teacher()
        return self._teacher

    def load_teacher(self) -> None:
        """Load the frozen teacher (EMA weights unless ``teacher_ema: false``) and check it against the student."""
        hp = self.hparams
        try:
            module = load_generator(hp.teacher_ckpt, ema=hp.teacher_ema, tokenizer_ckpt=hp.tokenizer_ckpt)
        except ValueError as e:
            raise ValueError(f"the teacher {hp.teacher_ckpt} ({TEACHER_OPTION}) cannot be used with this student: {e}") from None
        teacher = module.generator.to(self.device).eval().requires_grad_(False)
        t_pns = tuple(teacher.patch_nums)
        try:
            subset_indices(self.patch_nums, t_pns)
        except ValueError as e:
            raise ValueError(f"model.init_args.schedule {list(self.patch_nums)} does not fit the teacher "
                             f"{hp.teacher_ckpt} ({TEACHER_OPTION}) with patch_nums {list(t_pns)}: {e}") from None  # fmt: skip
        if hp.soft_weight > 0 and coincident_scales(self.patch_nums, t_pns) == 0:
            raise ValueError(f"model.init_args.soft_weight={hp.soft_weight} > 0, but no scale of the schedule "
                             f"{list(self.patch_nums)} sees a teacher state (it must start as the teacher's "
                             f"{list(t_pns)} does); set soft_weight: 0")  # fmt: skip
        self.teacher_info = {"path": module.checkpoint_path, "abspath": str(Path(module.checkpoint_path).resolve()),
                             "fingerprint": fingerprint(teacher), "ema": module.loaded_with_ema,
                             "patch_nums": list(t_pns)}  # fmt: skip
        self._check_teacher()
        object.__setattr__(self, "_teacher", teacher)  # not a registered submodule, on purpose
        hp.teacher_ckpt = module.checkpoint_path  # pinned: the checkpoint records the file, not a run folder

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.cuda()`` / dtype casts reach the unregistered teacher too."""
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()
        return self

    def setup(self, stage: str) -> None:
        needs_teacher = stage == "fit" or (self.hparams.init_from == "teacher" and not self._weights_set)
        if needs_teacher and self._teacher is None:
            self.load_teacher()
        super().setup(stage)

    def load_initial_weights(self, path: str) -> None:
        """``teacher``: the teacher's weights, with the embeddings of the scales of the student's sizes."""
        if path != "teacher":
            return super().load_initial_weights(path)
        self.init_generator_from(self.teacher.state_dict(), self.teacher.patch_nums,
                                 f"the teacher {self.hparams.teacher_ckpt}", self.hparams.init_from_ignore)  # fmt: skip
        self._weights_set = True

    # ---- targets -------------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_latents(self, label_B: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """f̂_T (B, C, h, w) of one teacher sample per label, seeds drawn from ``rng`` (the step's generator)."""
        from srdd_lightning.sampling.sampler import Sampler

        seeds = torch.randint(0, 2**62, (label_B.shape[0],), generator=rng).tolist()
        self._tokenizer_to_device()
        out = Sampler(self.teacher, self.tokenizer).sample(label_B, self.teacher_sampling, seeds=seeds)
        return self.tokenizer.tokens_to_fhat(out.tokens, out.schedule)

    def soft_loss(self, x0_BChw: torch.Tensor, label_B: torch.Tensor, logits_BLV: torch.Tensor) -> torch.Tensor:
        """Σ_l (1/L) KL(p_T ‖ p_S) over the tokens of the coincident scales (the common prefix), mean over the batch."""
        t_pns = self.teacher.patch_nums
        n = coincident_scales(self.patch_nums, t_pns)
        l_c = num_tokens(self.patch_nums[:n])
        _, x_T = self.chain_targets(x0_BChw, t_pns)
        with torch.no_grad():
            logp_T = self.teacher(label_B, x_T)[:, :l_c].log_softmax(-1)
        logp_S = logits_BLV[:, :l_c].float().log_softmax(-1)
        kl_Bl = (logp_T.exp() * (logp_T - logp_S)).sum(-1)
        return kl_Bl.sum(1).div(logits_BLV.shape[1]).mean()

    def _forward_loss(self, batch, rng: torch.Generator | None):
        if rng is None:  # validation / test: real data on the student's schedule, whatever the targets
            return super()._forward_loss(batch, rng)
        img_B3HW, label_B = batch
        if self.hparams.targets == "teacher":
            x0 = self.teacher_latents(label_B, rng)
        else:
            with torch.no_grad(), torch.autocast(device_type=img_B3HW.device.type, enabled=False):
                x0 = self.tokenizer.encode(img_B3HW.float())
        gt_BL, x_BLC = self.chain_targets(x0)
        label_B = self.generator.drop_labels(label_B, p=self.hparams.cond_drop, generator=rng)
        logits_BLV = self.generator(label_B, x_BLC, generator=rng)
        ce_BL = token_cross_entropy(logits_BLV, gt_BL, self.hparams.label_smoothing)
        self._kl = self.soft_loss(x0, label_B, logits_BLV) if self.hparams.soft_weight > 0 else None
        return ce_BL, logits_BLV, gt_BL

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)  # train/loss: the cross-entropy on the student's targets
        if self._kl is not None:
            kl, self._kl = self._kl, None
            loss = loss + self.hparams.soft_weight * kl
            self.log_dict({"train/kl_teacher": kl, "train/objective": loss}, batch_size=batch[1].shape[0])
        return loss

    # ---- checkpoints: the teacher is referenced, not stored -----------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.teacher_info is not None:
            checkpoint[CKPT_TEACHER_KEY] = dict(self.teacher_info)

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also refuse a checkpoint trained with another teacher: now if the teacher is loaded (a resumed fit), else
        when it is (sampling a student never loads it)."""
        super().check_checkpoint(checkpoint)
        self._recorded_teacher = checkpoint.get(CKPT_TEACHER_KEY)
        self._check_teacher()

    def _check_teacher(self) -> None:
        saved, now = getattr(self, "_recorded_teacher", None), self.teacher_info
        if saved and now and saved.get("fingerprint") != now["fingerprint"]:
            raise ValueError(f"this student was distilled from the teacher {saved.get('path')} (weights "
                             f"{saved.get('fingerprint')}), but {TEACHER_OPTION} now gives {now['path']} with "
                             f"different weights ({now['fingerprint']}); point teacher_ckpt at the teacher it was "
                             "trained with (a resumed run reads teacher_ckpt from its checkpoint)")


__all__ = ["BEST_ROW_SAMPLING", "CKPT_TEACHER_KEY", "StudentModule", "coincident_scales"]

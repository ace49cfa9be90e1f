"""The JSON index written beside a dataset's shards: per-shard counts, classes, resolution.

Two formats share it: packed images (``srdd-shards-v1``, written by ``srdd data digits|folder``) and token
caches (``srdd-tokens-v1``, written by ``srdd data tokenize``), whose ``tokens`` entry names the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..utils.io import atomic_write_text

INDEX_NAME = "index.json"
FORMAT = "srdd-shards-v1"
TOKENS_FORMAT = "srdd-tokens-v1"


@dataclass
class ShardInfo:
    """One tar shard: its file name (relative to the index) and how many samples it holds."""

    file: str
    count: int


@dataclass
class SplitInfo:
    """The shards of one split (``train`` or ``val``)."""

    shards: list[ShardInfo]

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)


@dataclass
class ShardIndex:
    """What a packed dataset holds; read by the datamodule, the CLI and the evaluation code."""

    name: str
    resolution: int
    classes: list[str]
    splits: dict[str, SplitInfo]
    source: str = ""
    extra: dict = field(default_factory=dict)
    root: Path | None = None
    tokens: dict | None = None  # a token cache's tokenizer (fingerprint, path, patch_nums, ...); None for images

    @property
    def num_classes(self) -> int:
        """Number of real classes; 1 for an unconditional dataset (the null class is added by the model)."""
        return len(self.classes)

    @property
    def conditional(self) -> bool:
        return len(self.classes) > 1

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise KeyError(f"dataset {self.name!r} at {self.root} has no {name!r} split (it has {sorted(self.splits)})")
        return self.splits[name]

    def shard_paths(self, split: str) -> list[Path]:
        assert self.root is not None
        return [self.root / s.file for s in self.split(split).shards]

    def summary(self) -> str:
        """One line per split, for the end of ``srdd data``."""
        lines = [f"dataset {self.name!r} at {self.root}: {self.resolution} px, {self.num_classes} class(es)"]
        if self.tokens is not None:
            t = self.tokens
            lines[0] = (f"token cache of {self.source} at {self.root}: {self.resolution} px, {self.num_classes} "
                        f"class(es), {t['num_tokens']} tokens per image on patch_nums {t['patch_nums']} of the "
                        f"tokenizer {t['tokenizer']} (weights {t['fingerprint']})"
                        + (", train also flipped" if t["flip"] else ""))  # fmt: skip
        for k, v in self.splits.items():
            lines.append(f"  {k}: {v.total} samples in {len(v.shards)} shard(s)")
        if self.extra.get("skipped_files"):
            examples = ", ".join(self.extra.get("skipped_examples", []))
            lines.append(f"  skipped {self.extra['skipped_files']} file(s) that are not readable images"
                         + (f" (e.g. {examples})" if examples else ""))
        if self.extra.get("skipped_classes"):
            lines.append(f"  skipped empty class folder(s): {', '.join(self.extra['skipped_classes'])}")
        if self.extra.get("upscaled"):
            lines.append(f"  upscaled {self.extra['upscaled']} image(s) smaller than {self.resolution} px")
        return "\n".join(lines)

    def to_json(self) -> dict:
        splits = {k: {"total": v.total, "shards": [asdict(s) for s in v.shards]} for k, v in self.splits.items()}
        out = {"format": FORMAT if self.tokens is None else TOKENS_FORMAT, "name": self.name,
               "resolution": self.resolution, "num_classes": self.num_classes, "classes": self.classes,
               "source": self.source, "splits": splits, "extra": self.extra}
        if self.tokens is not None:
            out["tokens"] = self.tokens
        return out

    def save(self, root: str | Path) -> Path:
        """Write ``index.json`` atomically (its presence marks a complete pack)."""
        return atomic_write_text(Path(root) / INDEX_NAME, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, root: str | Path, tokens: bool | None = False) -> "ShardIndex":
        """Read ``<root>/index.json``; every problem is reported with the path and how to fix it.

        ``tokens``: False accepts packed images only, True a token cache only, None either.
        """
        root = Path(root)
        path = root / INDEX_NAME
        if not root.exists():
            raise FileNotFoundError(f"dataset folder {root} does not exist; pack one first, e.g. `srdd data digits "
                                    f"--out {root}` or `srdd data folder --src <images> --out {root}`")  # fmt: skip
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {root} is not a packed dataset (or its packing did not "
                                    f"finish); pack it with `srdd data digits` or `srdd data folder`")  # fmt: skip
        raw = read_raw(path)
        is_cache = raw["format"] == TOKENS_FORMAT
        if tokens is False and is_cache:
            raise ValueError(f"{root} is a token cache (written by `srdd data tokenize` from {raw.get('source')}), "
                             f"not packed images; give the packed image folder instead")  # fmt: skip
        if tokens is True and not is_cache:
            raise ValueError(f"{root} holds packed images, not a token cache; write one with "
                             f"`srdd data tokenize --data {root} --tokenizer RUN --out FOLDER`")  # fmt: skip
        try:
            splits = {k: SplitInfo(_shards(v["shards"])) for k, v in raw["splits"].items()}
            index = cls(name=str(raw["name"]), resolution=_positive_int(raw["resolution"]),
                        classes=[str(c) for c in raw["classes"]], splits=splits, source=str(raw.get("source", "")),
                        extra=dict(raw.get("extra", {})), root=root,
                        tokens=_token_entry(raw["tokens"]) if is_cache else None)  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"lacks the entry {e.args[0]!r}" if isinstance(e, KeyError) else f"is malformed ({e})"
            raise ValueError(f"{path} {what}; re-pack the dataset") from e
        if not index.classes:
            raise ValueError(f"{path} lists no classes; re-pack the dataset")
        seen: set[str] = set()
        for split, info in index.splits.items():
            if "total" in raw["splits"][split] and raw["splits"][split]["total"] != info.total:
                raise ValueError(f"{path}: the {split} split's total {raw['splits'][split]['total']} is not the sum "
                                 f"of its shard counts ({info.total}); the index was edited or damaged, re-pack")
            for s in info.shards:
                if s.file in seen:
                    raise ValueError(f"{path} lists shard {s.file} twice; re-pack the dataset")
                seen.add(s.file)
        for split in index.splits:
            for p in index.shard_paths(split):
                if not p.is_file():
                    raise FileNotFoundError(f"shard {p} listed in {path} is missing; re-pack the dataset")
        return index


def read_raw(path: Path) -> dict:
    """The JSON object in ``path`` with the right format tag, or a ValueError naming the file."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-pack the dataset") from e
    if not isinstance(raw, dict) or raw.get("format") not in (FORMAT, TOKENS_FORMAT):
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path} has format {found!r}, expected {FORMAT!r} (or {TOKENS_FORMAT!r}, a token "
                         f"cache); re-pack the dataset")  # fmt: skip
    return raw


TOKEN_KEYS = ("fingerprint", "tokenizer", "patch_nums", "vocab_size", "num_tokens", "flip")


def _token_entry(entry) -> dict:
    """The ``tokens`` entry of a token cache, with the keys readers rely on."""
    if not isinstance(entry, dict):
        raise ValueError(f"its tokens entry is {type(entry).__name__}, not an object")
    missing = [k for k in TOKEN_KEYS if k not in entry]
    if missing:
        raise KeyError(f"tokens.{missing[0]}")
    out = dict(entry)
    out["patch_nums"] = [int(p) for p in entry["patch_nums"]]
    out["num_tokens"], out["flip"] = int(entry["num_tokens"]), bool(entry["flip"])
    if out["num_tokens"] != sum(p * p for p in out["patch_nums"]):
        raise ValueError(f"tokens.num_tokens {out['num_tokens']} is not the sum of pn^2 over {out['patch_nums']}")
    return out


def listed_files(root: str | Path) -> list[str]:
    """The shard files an existing ``index.json`` lists (they belong to that pack); a ValueError if unreadable."""
    path = Path(root) / INDEX_NAME
    raw = read_raw(path)
    try:
        return [s.file for v in raw["splits"].values() for s in _shards(v["shards"])]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} is malformed ({e})") from e


def _shards(entries: list) -> list[ShardInfo]:
    shards = []
    for s in entries:
        name = str(s["file"])
        # Shards sit beside the index: a path elsewhere would make --overwrite delete files outside the pack.
        if Path(name).name != name or name in ("", ".", "..", INDEX_NAME):
            raise ValueError(f"shard file {name!r} is not a plain file name beside index.json")
        count = int(s["count"])
        if count < 1:
            raise ValueError(f"shard {name} has count {count}")
        shards.append(ShardInfo(name, count))
    return shards


def _positive_int(value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"resolution {value!r} is not a positive integer")
    return int(value)

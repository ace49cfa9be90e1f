"""The JSON index written beside a dataset's shards: per-shard counts, classes, resolution."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

INDEX_NAME = "index.json"
FORMAT = "srdd-shards-v1"


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
        for k, v in self.splits.items():
            lines.append(f"  {k}: {v.total} samples in {len(v.shards)} shard(s)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "resolution": self.resolution,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "source": self.source,
            "splits": {
                k: {"total": v.total, "shards": [asdict(s) for s in v.shards]} for k, v in self.splits.items()
            },
            "extra": self.extra,
        }

    def save(self, root: str | Path) -> Path:
        """Write ``index.json`` atomically (its presence marks a complete pack)."""
        path = Path(root) / INDEX_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, root: str | Path) -> "ShardIndex":
        """Read ``<root>/index.json``; every problem is reported with the path and how to fix it."""
        root = Path(root)
        path = root / INDEX_NAME
        if not root.exists():
            raise FileNotFoundError(
                f"dataset folder {root} does not exist; pack one first, e.g. `srdd data digits --out {root}` "
                f"or `srdd data folder --src <images> --out {root}`"
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {root} is not a packed dataset (or its packing did not finish); "
                f"pack it with `srdd data digits` or `srdd data folder`"
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-pack the dataset") from e
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path} has format {raw.get('format')!r}, expected {FORMAT!r}; re-pack the dataset")
        splits = {
            k: SplitInfo([ShardInfo(str(s["file"]), int(s["count"])) for s in v["shards"]])
            for k, v in raw["splits"].items()
        }
        index = cls(
            name=raw["name"],
            resolution=int(raw["resolution"]),
            classes=list(raw["classes"]),
            splits=splits,
            source=raw.get("source", ""),
            extra=raw.get("extra", {}),
            root=root,
        )
        for split in index.splits:
            for p in index.shard_paths(split):
                if not p.is_file():
                    raise FileNotFoundError(f"shard {p} listed in {path} is missing; re-pack the dataset")
        return index

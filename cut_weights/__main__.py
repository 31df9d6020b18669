"""python -m cut_weights input_dir=PATH output_dir=PATH world_size=N [dtype=auto|float16|bfloat16|float32]
                        [quantize=none|int8|int4] [group_size=128] [quantize_lm_head=true] [quantize_embedding=true]
                        [overwrite=false] [max_shard_size=4GB]
                        [progress=true]"""
from __future__ import annotations

import dataclasses
import sys

from cut_weights.cut import CutError, CutOptions, cut
from tp.checkpoint import CheckpointError
from tp.config import ConfigError

_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def parse_args(argv: list[str]) -> CutOptions:
    fields = {f.name: f for f in dataclasses.fields(CutOptions)}
    values: dict[str, object] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in fields:
            raise CutError(f"unexpected argument {arg!r}: expected key=value with key one of {', '.join(fields)}")
        if fields[key].type == "int":
            if not value.strip().isdigit():
                raise CutError(f"{key}={value!r}: expected a positive integer")
            values[key] = int(value)
        elif fields[key].type == "bool":
            if value.lower() not in _BOOLS:
                raise CutError(f"{key}={value!r}: expected true or false")
            values[key] = _BOOLS[value.lower()]
        else:
            values[key] = value
    missing = [k for k in ("input_dir", "output_dir", "world_size") if k not in values]
    if missing:
        raise CutError(f"missing {', '.join(k + '=...' for k in missing)}\nusage: {__doc__.strip()}")
    return CutOptions(**values)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        out = cut(parse_args(argv))
    except (CutError, ConfigError, CheckpointError, OSError) as err:  # OSError: disk full, permissions
        print(f"cut_weights: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cut_weights: interrupted; nothing was left behind", file=sys.stderr)
        return 130
    print(f"cut written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

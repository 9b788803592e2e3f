"""``python -m unimedvl.train PLAN --data DIR --out RUN ...`` - the ``unimedvl train`` command as a
module, for launchers: ``torchrun --nproc-per-node 8 -m unimedvl.train unimedvl --data ... --out ...``."""

import sys

from .cli import app


def main() -> None:
    app(["train", *sys.argv[1:]], prog_name="unimedvl.train")


if __name__ == "__main__":
    main()

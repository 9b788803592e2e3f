"""The command line keeps what users had: every command, sub-command, option name and short alias
recorded in ``cli_surface.json`` (from commit 5e2ab89, before the CLI became a package) is still
there with its default, and what changed since is listed here - so an unplanned change fails."""

from __future__ import annotations

import json
from pathlib import Path

from cli_surface import names, surface

RECORDED = json.loads((Path(__file__).parent / "cli_surface.json").read_text())

# names added since the recording: the sampler presets (`--preset` and the `presets` table) and
# weight-only quantisation on every command that loads a model, and `unimedvl quantize`
QUANTIZING = ("ask", "report", "generate", "edit", "chat", "serve", "eval vqa", "eval t2i")
ADDED = {
    "presets",
    "presets --json",
    "generate --preset",
    "edit --preset",
    "eval t2i --preset",
    *(f"{command} --quantize" for command in QUANTIZING),
    *("quantize", "quantize --model", "quantize -m", "quantize --out", "quantize -o", "quantize --scheme", "quantize --weights"),
    # placement over several devices on the same commands, and the plan printed by `info`
    *(f"{command} {option}" for command in QUANTIZING for option in ("--device-map", "--max-memory")),
    *(f"info {option}" for option in ("--device-map", "--max-memory", "--dtype", "--quantize", "--understanding-only")),
    # an existing --out is refused unless --overwrite says to replace it
    "generate --overwrite",
    "edit --overwrite",
    # upload limits of the server, applied from the header before decoding
    "serve --max-image-pixels",
    "serve --max-volume-voxels",
    # continuous batching of chat answers
    "serve --max-batch",
    "serve --max-image-batch",
    # the host allocator policy that keeps the server's RSS flat
    "serve --malloc-mmap-threshold",
    # step caching of image sampling
    *(f"{command} {option}" for command in ("generate", "edit")
      for option in ("--cache", "--cache-interval", "--cache-order", "--cache-warmup", "--cache-final")),
    # compiled denoising steps
    *(f"{command} --compile" for command in ("generate", "edit", "serve")),
}

# (command, parameter) -> new default: dtype "auto" (one precision policy); image-sampler fields
# default to None, which means "the preset's value" (unimedvl.inference.presets)
_SAMPLER_FIELDS = ("steps", "cfg_text_scale", "cfg_img_scale", "cfg_renorm_type", "cfg_renorm_min", "timestep_shift")
CHANGED_DEFAULTS = {
    **{(command, "dtype"): "auto" for command in ("ask", "report", "generate", "edit", "chat", "serve", "eval vqa", "eval t2i")},
    **{(command, field): None for command in ("generate", "edit") for field in _SAMPLER_FIELDS},
    ("eval t2i", "steps"): None,
}


def test_every_recorded_name_is_still_there():
    current = names(surface())
    missing = sorted(names(RECORDED) - current)
    assert not missing, f"commands/options that users had are gone: {missing}"


def test_no_name_was_added_unplanned():
    current = names(surface())
    assert current == names(RECORDED) | ADDED, (
        f"unplanned additions: {sorted(current - names(RECORDED) - ADDED)}; "
        f"planned but absent: {sorted(ADDED - current)}"
    )


def test_parameters_keep_their_kind_defaults_and_aliases():
    current = surface()
    differences = []
    for path, command in RECORDED.items():
        assert current[path]["group"] == command["group"], path
        for name, recorded in command["params"].items():
            now = current[path]["params"].get(name)
            if now is None:
                differences.append(f"{path}: parameter {name} is gone")
                continue
            expected = dict(recorded)
            if (path, name) in CHANGED_DEFAULTS:
                expected["default"] = CHANGED_DEFAULTS[path, name]
            for key, value in expected.items():
                if json.loads(json.dumps(now[key])) != value:
                    differences.append(f"{path} {name}.{key}: recorded {value!r}, now {now[key]!r}")
    assert not differences, "\n".join(differences)


def test_the_module_entry_points_run_the_same_app():
    """``python -m unimedvl``, ``python -m unimedvl.cli`` and ``python -m unimedvl.train`` (torchrun's
    entry) reach the commands of the package."""
    import subprocess
    import sys

    for module, expect in (("unimedvl", "presets"), ("unimedvl.cli", "quantize"), ("unimedvl.train", "--lora-rank")):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (module, result.stderr[-500:])
        assert expect in result.stdout, (module, result.stdout[-500:])

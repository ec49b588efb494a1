"""What pretrain.py and evaluate.py share as command-line programs: every user mistake ends in one line.

Hydra reports its own errors (a key that does not exist, an option that does not exist, an override it cannot
parse) in several lines that end with "Set the environment variable HYDRA_FULL_ERROR=1 ...". `one_line_errors`
replaces that report, for those mistakes only, with one line naming the key or option and the valid ones, closest
first. Anything else (a bug) keeps Hydra's report and its traceback.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hydra._internal import utils as hydra_internal
from hydra.errors import ConfigCompositionException, OverrideParseException

from athena.errors import AthenaError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class JobFailed(AthenaError):
    """One job of a multirun failed (its line is in its log); Hydra runs the other jobs, then re-raises the first."""


def one_line_errors(config_name: str) -> None:
    """Make Hydra's start-up (composing `config_name` with the command-line overrides) fail in one line.

    Hydra 1.3 runs composition through hydra._internal.utils.run_and_report, looked up at call time, so wrapping
    that one function covers `python pretrain.py ...`, `--cfg job` and `-m`; a multirun whose job failed ends in that
    job's line too. Pinned hydra-core 1.3.8."""
    original = hydra_internal.run_and_report
    if getattr(original, "athena_one_line", False):
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        def guarded() -> Any:
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as error:
                exit_with_error(describe_hydra_error(error, config_name))
            except JobFailed as error:  # a multirun's first failed job, re-raised once every job has run
                exit_with_error(str(error))

        return original(guarded)

    run_and_report.athena_one_line = True
    hydra_internal.run_and_report = run_and_report


def exit_with_error(message: str) -> None:
    """Print `error: <message>` as the last line and exit 1. Under torchrun, also leave the line in the process's
    error file, so torchrun's failure report (and athena.launch, which prints only that) names it."""
    line = f"error: {message}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}
        try:
            with open(error_file, "w") as f:
                json.dump({"message": record}, f)
        except OSError:
            pass  # the report is a courtesy; the line below is what counts
    sys.exit(line)


def describe_hydra_error(error: Exception, config_name: str) -> str:
    """One line for a Hydra composition error."""
    options = getattr(error, "options", None)
    missing = getattr(error, "missing_cfg_file", None)
    if options is not None and missing:  # `adapter=polly`: an option file that does not exist
        group, _, option = missing.rpartition("/")
        return f"unknown option {group}={option}; valid options: {', '.join(closest(option, list(options)))}"
    if isinstance(error, OverrideParseException):
        reason = str(error).strip().splitlines()[0]
        return f"cannot parse the override {error.override!r} ({reason}); write key=value, e.g. train.lr=1e-3"
    message = str(error).strip()
    unknown = re.match(r"Could not override '([^']+)'", message)
    if unknown:
        key = unknown.group(1)
        near = closest_keys(key, config_keys(config_name))
        hint = f"; closest: {', '.join(near)}" if near else ""
        return f"unknown config key {key!r}{hint} (python {Path(sys.argv[0]).name} --cfg job lists every key)"
    exists = re.match(r"Could not append to config. An item is already at '([^']+)'", message)
    if exists:
        return f"{exists.group(1)} already exists: override it without the '+' ({exists.group(1)}=...)"
    return message.splitlines()[0]


def closest(word: str, choices: list[str]) -> list[str]:
    """`choices` ordered by similarity to `word`, most similar first."""
    return sorted(choices, key=lambda c: (-difflib.SequenceMatcher(None, word, c).ratio(), c))


def closest_keys(key: str, keys: list[str], limit: int = 4) -> list[str]:
    """The valid dotted keys most likely meant by `key`: same last part first (`optimizer.lr` ->
    `optimizer.model.lr`), then by spelling of the whole path and of the last part."""
    leaf = key.rsplit(".", 1)[-1]

    def score(candidate: str) -> tuple:
        cand_leaf = candidate.rsplit(".", 1)[-1]
        whole = difflib.SequenceMatcher(None, key, candidate).ratio()
        part = difflib.SequenceMatcher(None, leaf, cand_leaf).ratio()
        return (cand_leaf != leaf, -max(whole, part), candidate)

    ranked = sorted(keys, key=score)
    return [k for k in ranked if score(k)[0] is False or -score(k)[1] >= 0.6][:limit]


def config_keys(config_name: str) -> list[str]:
    """Every dotted key of the config as composed with the command line's group choices (e.g. `adapter=lora`),
    or with the defaults if those do not compose either."""
    from hydra import compose
    from omegaconf import OmegaConf

    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    choices = [a for a in sys.argv[1:] if re.fullmatch(r"[\w/]+=[\w.-]+", a) and a.split("=")[0] in groups]
    for overrides in (choices, []):
        try:
            cfg = OmegaConf.to_container(compose(config_name, overrides=overrides), resolve=False)
            break
        except Exception:  # noqa: BLE001 - best effort: a hint for an error message
            cfg = {}
    return sorted(_dotted(cfg))


def _dotted(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "hydra":
                continue
            path = f"{prefix}.{key}" if prefix else str(key)
            keys.append(path)
            keys += _dotted(value, path)
    return keys

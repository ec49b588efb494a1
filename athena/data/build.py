"""Build datasets once and cache them: ensure_dataset(out_dir, {"_target_": "athena.data.sudoku.build_sudoku", ...}).

Also the parallel, process-count-independent generation loop the builders share.

CLI:  python -m athena.data.build TARGET OUT_DIR [key=value ...]
      e.g. python -m athena.data.build sudoku data/sudoku-9x9 num_train=1000 num_test=1000
"""

from __future__ import annotations

import argparse
import collections.abc
import fcntl
import hashlib
import importlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable

from tqdm.auto import tqdm

from athena.data.format import DamagedDatasetError, DatasetError, open_split

ALIASES = {
    "sudoku": "athena.data.sudoku.build_sudoku",
    "sudoku_extreme": "athena.data.sudoku_extreme.build_sudoku_extreme",
    "maze": "athena.data.maze.build_maze",
    "arc": "athena.data.arc.build_arc",
    "synthetic": "athena.data.synthetic.build_synthetic",
    "text": "athena.data.text.build_text",
}
SPLITS = ("train", "test")  # the splits every builder writes and the recipes open


# ----------------------------------------------------------------------------------------------------- generation

def num_processes(num_items: int) -> int:
    return max(1, min(os.cpu_count() or 1, num_items))


def _default_signals() -> None:
    """Pool worker initializer. A forked worker inherits the parent's Python signal handlers (pretrain.py installs
    some), and a Python handler can miss a SIGTERM that lands just before the worker blocks on the task queue's
    lock: the worker then never exits and Pool.terminate() waits on it forever (seen in CI). The kernel's default
    action cannot miss it. Ctrl-C reaches the whole process group: the parent handles it and ends the pool."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _worker_pool(processes: int):
    """A process pool that, when its block ends normally, lets its workers finish and exit on their own (close +
    join: no signal needed); on an exception it terminates them."""
    pool = multiprocessing.Pool(processes, initializer=_default_signals)
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def parallel_map(fn: Callable, items: Iterable, *, desc: str) -> list:
    """[fn(x) for x in items] over min(cpu_count, len(items)) processes, in order, with a progress bar.
    `fn` must be a module-level function; determinism is the caller's job (seed each item from its index)."""
    items = list(items)
    processes = num_processes(len(items))
    if processes == 1:
        return [fn(x) for x in tqdm(items, desc=desc)]
    with _worker_pool(processes) as pool:
        chunksize = max(1, len(items) // (processes * 16))
        return list(tqdm(pool.imap(fn, items, chunksize=chunksize), total=len(items), desc=desc))


def generate_distinct(worker: Callable[[Any], tuple[Any, Hashable]], make_args: Callable[[int], Any], count: int, *,
                      exclude: set | None = None, desc: str, max_attempts: int | None = None) -> list:
    """Run `worker(make_args(i))` for i = 0, 1, 2, ... and keep, in index order, the first `count` results whose
    key (the worker returns (item, key)) is new and not in `exclude`. Candidates are generated in parallel
    chunks, but acceptance walks them in index order, so the result does not depend on the process count."""
    seen = set(exclude or ())
    accepted: list = []
    next_index = 0
    max_attempts = max_attempts if max_attempts is not None else 4 * count + 1000
    processes = num_processes(count)
    pool_or_none = _worker_pool(processes) if processes > 1 else nullcontext()
    with tqdm(total=count, desc=desc) as progress, pool_or_none as pool:
        while len(accepted) < count:
            if next_index >= max_attempts:
                raise DatasetError(
                    f"{desc}: only {len(accepted)} distinct of {count} wanted after {next_index} attempts; "
                    f"ask for fewer, or relax the constraints (size, min_difficulty, max_clues, min_path_len)")
            need = count - len(accepted)
            chunk = [make_args(i) for i in range(next_index, min(next_index + need + need // 10 + 8, max_attempts))]
            next_index += len(chunk)
            results = pool.imap(worker, chunk, chunksize=max(1, len(chunk) // 64)) if pool else map(worker, chunk)
            for item, key in results:
                if len(accepted) < count and key not in seen:
                    seen.add(key)
                    accepted.append(item)
                    progress.update(1)
    return accepted


# ----------------------------------------------------------------------------------------------------- caching

def resolve_target(target: str) -> Callable:
    target = ALIASES.get(target, target)
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as error:
        raise DatasetError(f"cannot resolve dataset builder {target!r} ({error}); "
                         f"use a dotted path like athena.data.sudoku.build_sudoku or one of {sorted(ALIASES)}") from None


def _plain(value: Any) -> Any:
    """JSON-able copy of a (possibly OmegaConf) config value, so specs compare by content."""
    if isinstance(value, collections.abc.Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, collections.abc.Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


@contextmanager
def _exclusive(path: Path):
    """Inter-process lock, so concurrent launchers (e.g. several ranks) build a dataset only once."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def dataset_dir(name: str, build: dict, data_root: str | Path, directory: str | Path | None = None) -> Path:
    """`directory` if given (data.dir), else <data_root>/<name>-<hash of the build spec>: each spec its own cache."""
    if directory:
        return Path(directory)
    digest = hashlib.sha1(json.dumps(build, sort_keys=True).encode()).hexdigest()[:8]
    return Path(data_root) / f"{name}-{digest}"


BUILDING = ".building-"  # ensure_dataset builds <parent>/<name> in <parent>/.<name>.building-XXXX, then renames it


def final_dir(path: str | Path) -> Path:
    """The absolute folder that the folder a builder is writing will become: <parent>/<name> for ensure_dataset's
    temp folder <parent>/.<name>.building-XXXX, the folder itself otherwise (a builder called directly). For builders
    that write absolute paths into their output (text task configs)."""
    path = Path(path).resolve()
    match = re.fullmatch(rf"\.(.+){re.escape(BUILDING)}[^/]*", path.name)
    return path.parent / match.group(1) if match else path


def ensure_dataset(out_dir: str | Path, build: dict) -> Path:
    """Return `out_dir`, building it first unless out_dir/build.json equals `build` and its splits are whole.

    `build` = {"_target_": dotted path of a builder fn(out_dir, **kwargs), **kwargs}. A build goes into a temp
    folder next to out_dir that is renamed into place only when complete, so a killed build leaves nothing
    half-written (its temp folder is removed by the next call). A cache found damaged (a file truncated or
    deleted since, an interrupted copy) is rebuilt: it holds nothing the spec cannot make again. A folder
    holding a dataset but no build.json (e.g. one built by TRM's scripts) is used as is; PuzzleDataset checks
    it when it is opened."""
    out_dir = Path(out_dir)
    spec = _plain(build)
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise DatasetError(f"dataset build spec needs a _target_ (builder function), got {spec!r}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir.parent / f".{out_dir.name}.lock"):
        # Builds run under this lock, so temp folders left here belong to a build that was killed.
        for leftover in out_dir.parent.glob(f".{out_dir.name}{BUILDING}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in out_dir.parent.glob(f".{out_dir.name}.stale-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        recorded = out_dir / "build.json"
        if _recorded_spec(recorded) == spec:
            damage = _first_damage(out_dir)
            if damage is None:
                print(f"reusing dataset at {out_dir}")
                return out_dir
            print(f"dataset at {out_dir} is damaged ({damage[0]} {damage[1]}): rebuilding it")
        elif not recorded.exists() and (out_dir / "train" / "dataset.json").is_file():
            print(f"using dataset at {out_dir} as is (it has no build.json to compare the build spec with)")
            return out_dir

        builder = resolve_target(spec["_target_"])
        kwargs = {k: v for k, v in spec.items() if k != "_target_"}
        print(f"building dataset at {out_dir}: {spec}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{BUILDING}", dir=out_dir.parent))
        try:
            builder(tmp, **kwargs)
            damage = _first_damage(tmp)
            if damage is not None:
                raise DatasetError(f"builder {spec['_target_']} wrote a dataset that fails its check: "
                                   f"{damage[0].relative_to(tmp)} {damage[1]}")
            (tmp / "build.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
            if out_dir.exists():  # a stale build of different parameters: move it aside, then delete
                stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stale-", dir=out_dir.parent))
                os.rename(out_dir, stale / "old")
                os.rename(tmp, out_dir)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.rename(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _recorded_spec(path: Path) -> Any:
    """The build spec a cache records, or None if it has none or it is unreadable (then it is rebuilt)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _first_damage(root: Path) -> tuple[Path, str] | None:
    """(file, what is wrong) of the first damaged split of a built dataset (every builder writes train and test)."""
    for split in SPLITS:
        if not (root / split).is_dir():
            return root / split, "is missing"
        try:
            open_split(root, split)
        except DamagedDatasetError as damage:
            return damage.path, damage.problem
    return None


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m athena.data.build",
        description="Build (or reuse) a puzzle dataset. Values are parsed as JSON when they can be "
                    "(num_train=1000, diagonal=true), else kept as strings.")
    parser.add_argument("target", help=f"builder: one of {sorted(ALIASES)} or a dotted path")
    parser.add_argument("out_dir", help="dataset folder to create")
    parser.add_argument("params", nargs="*", metavar="key=value", help="builder keyword arguments")
    args = parser.parse_args(argv)
    spec: dict[str, Any] = {"_target_": ALIASES.get(args.target, args.target)}
    for param in args.params:
        key, sep, value = param.partition("=")
        if not sep:
            parser.error(f"expected key=value, got {param!r}")
        spec[key] = _parse_value(value)
    print(ensure_dataset(args.out_dir, spec))


if __name__ == "__main__":
    main()

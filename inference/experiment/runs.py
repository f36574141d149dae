"""Run directories and the checkpoint: every file of a run is named, and written, here.

A run directory ``RUN/`` holds:

- ``.pyrovae-run`` (:data:`MARKER`): says pyrovae made it, so only it is ever replaced;
- ``spec.toml`` (:data:`SPEC`): the resolved spec, written when the run is staged;
- ``images.json`` (:data:`IMAGES`), for data read from a folder of images: the images it
  was trained on, in split order, so that the run's test images stay its own when the
  folder changes;
- ``checkpoint.pt``, ``previous.pt``, ``best.pt`` (:data:`CHECKPOINT`, :data:`PREVIOUS`,
  :data:`BEST`): written by :class:`Checkpoint`; ``metrics.csv`` (:data:`METRICS`) beside
  each latest checkpoint;
- ``tensorboard/`` (:data:`TENSORBOARD`) with ``train.log = "tensorboard"``;
- the outputs of the commands run on it: ``evaluation.json`` (:data:`EVALUATION`),
  ``report.html`` (:data:`REPORT`), ``samples.png`` (:data:`SAMPLES`).

A run is staged in ``.RUN.partial-*`` beside its path (:func:`stage_run`,
:class:`RunDirectory`) and promoted once its first checkpoint is written; a run being written
is locked (:func:`run_lock`); every file is replaced atomically (:func:`atomic_write`).

:class:`Checkpoint` is the only code that knows the checkpoint file's layout: it holds state
dicts and plain values, is written with ``torch.save`` to a temporary file that is then
renamed over the old one (a run killed mid-write keeps its previous checkpoint), and is read
with ``torch.load(..., weights_only=True)``. Objects are never pickled: a run is reloaded by
building its model and guide from ``spec.toml`` and loading the state dicts.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib
import torch
from torch import Tensor, nn

from pyrovae.inference.errors import DiskFull, PyrovaeError
from pyrovae.inference.experiment.build import build
from pyrovae.inference.experiment.data import Splits, check_data, load_data
from pyrovae.inference.experiment.spec import Spec, load_spec
from pyrovae.model.labelled import Labelled

__all__ = [
    "BEST",
    "CHECKPOINT",
    "EVALUATION",
    "IMAGES",
    "MARKER",
    "METRICS",
    "REPORT",
    "SAMPLES",
    "SPEC",
    "TENSORBOARD",
    "Checkpoint",
    "Run",
    "RunDirectory",
    "atomic_write",
    "check_replaceable",
    "check_fingerprint",
    "check_writable",
    "load_run",
    "load_run_data",
    "promote_run",
    "restore_spec",
    "run_lock",
    "stage_run",
]

try:  # POSIX advisory locks; where there are none, runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

MARKER = ".pyrovae-run"
"""The file pyrovae writes into every run directory it creates: only such a directory is ever
replaced (``--force``)."""
SPEC = "spec.toml"
IMAGES = "images.json"
"""The listing of a run's image folder (:attr:`~.data.Splits.listing`): the files, relative to
the folder, in the order the splits take them, and the class names."""
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
"""The checkpoint of the epoch with the best validation ELBO, in a run with early stopping
(``train.patience``): model and guide only, what early stopping selects for evaluation."""
CHECKPOINTS = {"latest": CHECKPOINT, "best": BEST}
"""Which checkpoint of a run to load, by name."""
PREVIOUS = "previous.pt"
"""The checkpoint before the latest one, kept so that a damaged ``checkpoint.pt`` has an
intact one to fall back to."""
METRICS = "metrics.csv"
TENSORBOARD = "tensorboard"
"""The TensorBoard event folder of a run trained with ``train.log = "tensorboard"``."""
EVALUATION = "evaluation.json"
"""Where ``evaluate`` writes its settings, summary and per-point figures by default."""
REPORT = "report.html"
"""Where ``report`` writes its page by default."""
SAMPLES = "samples.png"
"""Where ``sample`` writes its image grid by default."""
FORMAT = 3
"""Version of the checkpoint layout, stored in every file: 2 wraps the state with its SHA-256
(checked on every load); 3 counts ``features`` without a labelled model's label columns (which
2 and 1, still read, counted: labels were then columns of the data)."""


@dataclass
class Checkpoint:
    """The state of a run after an epoch.

    Attributes:
        epoch: epochs finished.
        model: the model's state dict.
        guide: the guide's state dict.
        optimizer: the optimizer's state dict.
        lr_scheduler: the learning-rate scheduler's state dict (empty without one).
        rng: random number generator states (``torch`` and, where present, ``cuda``).
        history: one dict of floats per epoch (the metrics ``fit`` returns).
        features: number of data features the model was built for.
        image_shape: ``(H, W)`` or ``(C, H, W)`` of image data, ``()`` for plain feature
            vectors.
        spec: the resolved spec the run was built from, as TOML, or None for a run made
            by ``fit`` alone.
        data_sha256: the fingerprint of the data the run was trained on
            (``Splits.fingerprint``), or None where it was not recorded.
    """

    epoch: int
    model: dict[str, Any]
    guide: dict[str, Any]
    optimizer: dict[str, Any] = field(default_factory=dict)
    lr_scheduler: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    features: int | None = None
    image_shape: tuple[int, ...] = ()
    spec: str | None = None
    data_sha256: str | None = None

    @property
    def spec_hash(self) -> str | None:
        """SHA-256 of the spec the checkpoint was written with."""
        return None if self.spec is None else hashlib.sha256(self.spec.encode()).hexdigest()

    def to_state(self) -> dict[str, Any]:
        """The checkpoint as plain values and tensors, for ``torch.save``."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["image_shape"] = list(self.image_shape)
        return {"format": FORMAT, **state}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Checkpoint:
        """The inverse of :meth:`to_state`.

        Raises:
            PyrovaeError: the state is not a checkpoint of this layout.
        """
        names = [f.name for f in fields(cls)]
        missing = [n for n in ("epoch", "model", "guide") if n not in state]
        if not isinstance(state, Mapping) or missing:
            raise PyrovaeError(f"not a pyrovae checkpoint (missing {', '.join(missing)})")
        values = {k: v for k, v in state.items() if k in names}
        values["image_shape"] = tuple(values.get("image_shape") or ())
        if state.get("format", 1) < 3 and values.get("features") and values.get("spec"):
            model = tomllib.loads(values["spec"]).get("model", {})
            if model.get("labels", "none") != "none":
                values["features"] -= int(model.get("classes", 10))
        return cls(**values)

    def save(self, run_dir: str | Path, name: str = CHECKPOINT) -> None:
        """Writes ``name`` (``checkpoint.pt``) and, for the latest checkpoint, ``metrics.csv``
        into ``run_dir``, each atomically; the checkpoint it replaces is kept as
        ``previous.pt``. The file holds the state's bytes with their SHA-256, which every
        :meth:`load` checks."""
        run_dir = Path(run_dir)
        inner = io.BytesIO()
        torch.save(self.to_state(), inner)
        payload = inner.getvalue()
        outer = io.BytesIO()
        torch.save(
            {
                "format": FORMAT,
                "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
            },
            outer,
        )
        file = run_dir / name
        if name == CHECKPOINT and file.is_file():
            _keep_as(file, run_dir / PREVIOUS)
        atomic_write(file, outer.getvalue())
        if self.history and name == CHECKPOINT:
            text = io.StringIO()
            # Every key any epoch has, in order of first appearance: a run resumed by a newer
            # version may add one (an empty cell for the epochs before).
            fields = list(dict.fromkeys(key for entry in self.history for key in entry))
            writer = csv.DictWriter(text, fieldnames=fields, restval="", lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.history)
            atomic_write(run_dir / METRICS, text.getvalue().encode())

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        map_location: str | torch.device = "cpu",
        name: str = CHECKPOINT,
    ) -> Checkpoint | None:
        """The checkpoint ``name`` (``checkpoint.pt``) in ``run_dir``, or None when it has none.

        Raises:
            PyrovaeError: the file exists but cannot be read.
        """
        file = Path(run_dir) / name
        if not file.is_file():
            return None
        state = _read_state(file, map_location)
        if state is None:
            raise PyrovaeError(
                f"{file} is damaged (unreadable, or its checksum does not match its contents); {_fallback(file)}"
            )
        return cls.from_state(state)

    def restore(
        self,
        model: nn.Module,
        guide: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        where: str | Path = "the checkpoint",
    ) -> None:
        """Loads the state dicts into ``model``, ``guide`` and ``optimizer``.

        Raises:
            PyrovaeError: the state dicts do not fit the modules (e.g. an edited spec).
        """
        try:
            guide.load_state_dict(self.guide)
            legacy = _shared_missing(model, guide, self.model)
            model.load_state_dict({**self.model, **legacy})
            if optimizer is not None and self.optimizer:
                saved = self.optimizer
                if legacy:
                    saved = _reordered(saved, model, guide, optimizer)
                optimizer.load_state_dict(saved)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise PyrovaeError(
                f"{where} does not match the model it is loaded into ({first}); "
                "was the spec edited after training?"
            ) from None


def _shared_missing(model: nn.Module, guide: nn.Module, state: Mapping[str, Any]) -> dict:
    """The entries missing from a model ``state`` written before the model registered the
    modules it shares with the guide (M2's classifier): their values, already loaded into the
    guide. Empty for any other state (which ``load_state_dict`` then checks strictly)."""
    shared = {id(t) for t in guide.state_dict(keep_vars=True).values()}
    current = model.state_dict(keep_vars=True)
    missing = {k: v for k, v in current.items() if k not in state}
    if not missing or any(id(v) not in shared for v in missing.values()):
        return {}
    return {k: v.detach() for k, v in missing.items()}


def _reordered(
    saved: Mapping[str, Any], model: nn.Module, guide: nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """An optimizer state saved when the shared modules' parameters came with the guide
    (after the model's own), in the order of ``optimizer``'s parameters now."""
    shared = {id(p) for p in guide.parameters()}
    then = [p for p in model.parameters() if id(p) not in shared] + list(guide.parameters())
    now = [p for group in optimizer.param_groups for p in group["params"]]
    if len(saved["param_groups"]) != 1 or len(then) != len(now):
        raise ValueError("the optimizer state does not fit the parameters")
    position = {id(p): i for i, p in enumerate(then)}
    old = saved["param_groups"][0]["params"]
    state = {}
    for j, p in enumerate(now):
        key = old[position[id(p)]]
        if key in saved["state"]:
            state[j] = saved["state"][key]
    group = {**saved["param_groups"][0], "params": list(range(len(now)))}
    return {"state": state, "param_groups": [group]}


@dataclass
class Run:
    """A trained run loaded from disk.

    Attributes:
        path: the run directory.
        spec: its resolved spec.
        model, guide: built from the spec with the checkpoint's parameters, in eval mode.
        checkpoint: the :class:`Checkpoint` they were loaded from.
    """

    path: Path
    spec: Spec
    model: nn.Module
    guide: nn.Module
    checkpoint: Checkpoint

    @property
    def epoch(self) -> int:
        return self.checkpoint.epoch

    @property
    def history(self) -> list[dict[str, float]]:
        return self.checkpoint.history

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.checkpoint.image_shape

    def data(self) -> Splits:
        """The run's data, split and binarized as training saw them, checked against the
        fingerprint its checkpoint recorded (:func:`load_run_data`)."""
        return load_run_data(self)

    def points(
        self,
        split: str = "test",
        limit: int | None = None,
        data: Splits | None = None,
        purpose: tuple[str, int] = ("an evaluation", 1),
    ) -> tuple[Tensor | Labelled, Tensor | None]:
        """The first ``limit`` points of a split of the run's data (every point without a
        limit) and their labels: what ``evaluate``, ``compare`` and ``report`` score.

        Args:
            split: ``train``, ``validation`` or ``test``.
            limit: how many points, from the first.
            data: the splits to take them from; default the run's own (:meth:`data`).
            purpose: what the points are for and how many it needs at least, for the
                message when there are fewer.

        Raises:
            PyrovaeError: an unknown split, data of another width than the model's, values
                outside its likelihood's support, or too few points.
        """
        x, labels = (data or self.data()).split(split)
        features = self.checkpoint.features  # None in a run made by fit alone
        if features is not None and x.shape[1] != features:
            raise PyrovaeError(
                f"{self.path} was trained on {self.checkpoint.features} features but the data "
                f"have {x.shape[1]}"
            )
        support = getattr(getattr(self.model, "likelihood", None), "support", None)
        check_data(x, f"the {split} split", support)
        x, labels = x[:limit], None if labels is None else labels[:limit]
        what, least = purpose
        if len(x) < least:
            raise PyrovaeError(f"the {split} split has {len(x)} points; {what} needs {least}")
        return x, labels

    def output(self, name: str) -> Path:
        """The path of one of the run's outputs (:data:`EVALUATION`, :data:`REPORT`,
        :data:`SAMPLES`)."""
        return self.path / name


def check_writable(path: Path, what: str, create: bool = False) -> None:
    """Refuses, up front, a ``path`` that cannot be written: its folder is missing (unless
    ``create``, for folders pyrovae makes), the nearest existing folder lacks write
    permission, or something other than a folder stands in the way.

    Raises:
        PyrovaeError: one line naming the path and the problem.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not create and not folder.exists():
        raise PyrovaeError(f"cannot write {what} {path}: the folder {folder} does not exist")
    while not folder.exists():
        if folder.parent == folder:
            break
        folder = folder.parent
    if not folder.is_dir():
        raise PyrovaeError(f"cannot write {what} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PyrovaeError(f"cannot write {what} {path}: {folder} is not writable")


def check_replaceable(path: Path, keep: Iterable[Path] = ()) -> None:
    """Refuses to replace ``path`` unless pyrovae created it as a run (it holds the marker
    file) and it holds none of the files in ``keep`` (the spec and data being used).

    Raises:
        PyrovaeError: one line saying why the directory stays.
    """
    if not path.is_dir():
        raise PyrovaeError(f"{path} exists and is not a directory; choose another --out")
    if not (path / MARKER).is_file():
        raise PyrovaeError(
            f"{path} was not created by pyrovae as a run (no {MARKER} in it); refusing to "
            "replace it, even with --force: choose another --out"
        )
    inside = [k for k in map(Path, keep) if k.resolve().is_relative_to(path.resolve())]
    if inside:
        raise PyrovaeError(
            f"{path} holds {inside[0]}, which this run reads; refusing to replace it, even with "
            "--force: move that file or choose another --out"
        )


def _read_state(file: Path, map_location: str | torch.device = "cpu") -> Any:
    """The state in a checkpoint file, its checksum verified; None where the file cannot be
    read or its bytes do not match their checksum."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "sha256" in state:
            payload = state["payload"].numpy().tobytes()
            if hashlib.sha256(payload).hexdigest() != state["sha256"]:
                return None
            state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
        elif map_location != "cpu":  # a format-1 checkpoint, written without a checksum
            state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file is damaged in the same way
        return None
    return state


def _fallback(file: Path) -> str:
    """What to do about a damaged checkpoint: the intact one to fall back to, if any."""
    run_dir = file.parent
    previous = run_dir / PREVIOUS
    if file.name == CHECKPOINT and previous.is_file():
        state = _read_state(previous)
        if isinstance(state, Mapping) and "epoch" in state:
            return (
                f"{previous} (epoch {state['epoch']}) is intact: move it over {file} "
                f"(mv {previous} {file}) and resume from there"
            )
    if file.name != CHECKPOINT and (run_dir / CHECKPOINT).is_file():
        return f"the latest checkpoint, {run_dir / CHECKPOINT}, is another to load"
    return f"no intact checkpoint is left in {run_dir}; train the run again (--force)"


def _keep_as(file: Path, kept: Path) -> None:
    """Makes ``kept`` a copy of ``file`` (a hard link where the file system has them),
    replacing it atomically; ``file`` stays in place throughout."""
    staging = kept.with_name(f".{kept.name}.tmp-{os.getpid()}")
    try:
        os.link(file, staging)
    except OSError:
        shutil.copyfile(file, staging)
    os.replace(staging, kept)


def lock_file(path: Path) -> Path:
    """The lock of run directory ``path``: a hidden file beside it, ``.NAME.lock``, so that a
    run not created yet, or being replaced, can be locked too."""
    path = Path(path).absolute()
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def run_lock(path: str | Path) -> Iterator[None]:
    """Holds the exclusive lock of run directory ``path`` while the block runs: a second
    process that writes into the same run meets it and stops with one line. The lock is the
    kernel's (``flock`` on ``.NAME.lock`` beside the run), released when its holder exits, so
    a process killed while holding it (even by SIGKILL) leaves nothing stuck; the file is
    removed on release. The directory's parent must exist.

    Raises:
        PyrovaeError: another process holds the lock (named by its pid).
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock = lock_file(Path(path))
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PyrovaeError(
                f"{path} is in use by another pyrovae process (pid {holder}); wait for it to "
                "finish, or write elsewhere (--out, -o)"
            ) from None
        # The file may have been removed by its last holder after this process opened it:
        # then this lock guards nothing, and the current file is tried again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def stage_run(path: Path, spec: Spec, listing: dict[str, list[str]] | None = None) -> Path:
    """Makes a hidden staging directory beside ``path`` holding the marker, ``spec.toml`` and,
    for a folder of images, its ``listing`` (``images.json``); :func:`promote_run` moves it
    to ``path`` once it holds a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    os.chmod(staging, 0o777 & ~_umask())
    (staging / MARKER).write_text("a pyrovae run directory\n")
    atomic_write(staging / SPEC, spec.to_toml().encode())
    if listing is not None:
        atomic_write(staging / IMAGES, json.dumps(listing, indent=0).encode())
    return staging


def remove_stale_stages(path: Path) -> list[Path]:
    """Removes what killed trainings of run ``path`` left beside it: staging folders
    (``.NAME.partial-*``) and runs set aside for replacement (``.NAME.replaced-*``). Call it
    holding the run's lock, under which no other process can be staging that run; only
    folders holding a pyrovae run's marker (or nothing at all) are removed.

    Returns:
        The folders removed.
    """
    removed = []
    for prefix in (f".{path.name}.partial-", f".{path.name}.replaced-"):
        for folder in path.parent.glob(f"{prefix}*"):
            ours = (folder / MARKER).is_file() or (folder / path.name / MARKER).is_file()
            if folder.is_dir() and (ours or not any(folder.iterdir())):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


class RunDirectory:
    """Where a run being written lives now: a staging folder beside its path until its first
    checkpoint is written (so that a failed start never touches a run already there), then
    its path. The callbacks that write into the run share this object and read
    :attr:`path` when they write, so that nothing has to be repointed when the run moves.

    Args:
        path: where the run is written now (its staging folder, or the run itself).
        final: where the run ends up; default ``path`` (nothing staged).
    """

    def __init__(self, path: str | Path, final: str | Path | None = None) -> None:
        self.path = Path(path)
        self.final = Path(final) if final is not None else self.path

    @property
    def staged(self) -> bool:
        """Whether the run still lives in its staging folder."""
        return self.path != self.final

    @property
    def tensorboard(self) -> Path:
        """The TensorBoard event folder, ``RUN/tensorboard``."""
        return self.path / TENSORBOARD

    def promote(self) -> None:
        """Moves a staged run to its final path (replacing the run there); once only."""
        if self.staged:
            promote_run(self.path, self.final)
            self.path = self.final

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r}, final={str(self.final)!r})"


def promote_run(staging: Path, path: Path) -> None:
    """Puts the staged run at ``path``, replacing the run there: the old run is renamed
    aside first and deleted only once the new one is in place."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.replaced-"))
        os.replace(path, old / path.name)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def load_run(
    path: str | Path, map_location: str | torch.device = "cpu", checkpoint: str = "latest"
) -> Run:
    """Builds the model and guide of a run from its spec and loads its checkpoint.

    Args:
        path: the run directory.
        map_location: where the tensors are loaded.
        checkpoint: ``"latest"`` (``checkpoint.pt``, the last epoch) or ``"best"``
            (``best.pt``, the best validation ELBO, kept by runs with early stopping).

    Raises:
        PyrovaeError: the directory, spec or checkpoint is missing, or they do not match.
    """
    path = Path(path)
    if not path.is_dir():
        raise PyrovaeError(f"run directory {path} does not exist")
    if checkpoint not in CHECKPOINTS:
        raise PyrovaeError(f"unknown checkpoint {checkpoint!r}; valid: {', '.join(CHECKPOINTS)}")
    name = CHECKPOINTS[checkpoint]
    if checkpoint == "best" and not (path / name).is_file():
        raise PyrovaeError(
            f"{path} has no {name}: only a run with early stopping (train.patience) keeps "
            "its best epoch; use the latest checkpoint"
        )
    checkpoint = Checkpoint.load(path, map_location, name)
    if not (path / SPEC).is_file():
        if checkpoint is not None and checkpoint.spec is None:
            raise PyrovaeError(
                f"{path} holds a checkpoint written by fit (Checkpointing) without a spec; "
                "build the model and guide yourself and call "
                "Checkpoint.load(path).restore(model, guide)"
            )
        if checkpoint is not None and (path / MARKER).is_file():
            raise PyrovaeError(
                f"{path / SPEC} is missing, but {path / name} holds the spec the run was "
                'trained with; restore it with: python -c "from pyrovae.inference.experiment.'
                f"runs import restore_spec; restore_spec('{path}')\""
            )
        raise PyrovaeError(f"{path} is not a pyrovae run: {path / SPEC} does not exist")
    spec = load_spec(path / SPEC)
    if checkpoint is None:
        raise PyrovaeError(f"{path} has no {name} yet; train it first")
    _check_spec_matches(path, spec, checkpoint)
    model, guide = build(spec, checkpoint.features, checkpoint.image_shape)
    checkpoint.restore(model, guide, where=f"{path / name} (with {path / SPEC})")
    model.eval()
    guide.eval()
    return Run(path, spec, model, guide, checkpoint)


def restore_spec(path: str | Path) -> Path:
    """Writes a run's ``spec.toml`` again from the spec its checkpoint holds (after it was
    deleted or damaged); refuses to replace a ``spec.toml`` that is there.

    Returns:
        The path written.

    Raises:
        PyrovaeError: no run checkpoint with a spec, or a ``spec.toml`` already there.
    """
    path = Path(path)
    if (path / SPEC).exists():
        raise PyrovaeError(f"{path / SPEC} exists; move it away first to restore the original")
    checkpoint = Checkpoint.load(path)
    if checkpoint is None or checkpoint.spec is None:
        raise PyrovaeError(f"{path} has no checkpoint with a spec to restore {SPEC} from")
    atomic_write(path / SPEC, checkpoint.spec.encode())
    return path / SPEC


def _check_spec_matches(path: Path, spec: Spec, checkpoint: Checkpoint) -> None:
    """Refuses a ``spec.toml`` whose data, model or guide differ from the checkpoint's spec;
    training settings may differ (a resumed run changes ``train.epochs``)."""
    if checkpoint.spec is None:
        return
    try:
        saved = tomllib.loads(checkpoint.spec)
    except tomllib.TOMLDecodeError:
        return
    try:  # keys added since the run was trained take their defaults on both sides
        saved = Spec().replace(**saved).to_dict()
    except PyrovaeError:
        pass
    current = spec.to_dict()
    differ = [
        key
        for section in ("data", "model", "guide")
        for key in _differing(saved.get(section, {}), current.get(section, {}), section)
    ]
    if differ:
        raise PyrovaeError(
            f"{path / SPEC} does not match the spec {path / CHECKPOINT} was trained with: "
            f"{', '.join(differ)} differ; undo the edit or train a new run"
        )


def _differing(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [
            k
            for key in sorted({*a, *b})
            for k in _differing(a.get(key), b.get(key), f"{where}.{key}")
        ]
    return [] if a == b else [where]


def atomic_write(file: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``file``, then renames it over ``file``.

    Raises:
        DiskFull: the disk (or the quota) has no room for ``data``; ``file`` is unchanged
            and the partial temporary file is removed.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.")
    except OSError as e:
        raise _full(e, file, len(data)) from e
    try:
        # mkstemp makes the file private; give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _full(e, file, len(data)) from e
        raise


def _full(error: OSError, file: Path, size: int) -> OSError | DiskFull:
    """``error`` as a :class:`DiskFull` naming ``file`` when it is a full disk or quota."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return error
    try:
        free = f", {shutil.disk_usage(file.parent).free / 2**20:,.1f} MiB free"
    except OSError:
        free = ""
    state = "is unchanged" if file.exists() else "was not created"
    return DiskFull(
        f"no space left on the device to write {file} ({size / 2**20:,.1f} MiB{free}); "
        f"{file.name} {state}; free some space and run the command again"
    )


def load_run_data(run: Run | Spec, directory: Path | None = None) -> Splits:
    """The data set a spec names, split and binarized as training saw it. Given a
    :class:`Run` whose checkpoint recorded the data's fingerprint, the data found now must
    match it. A run of a folder of images reads the images its ``images.json`` lists, in
    that order, not whatever the folder holds now.

    Args:
        run: the run, or a spec.
        directory: with a spec, the run directory whose ``images.json`` to follow.

    Raises:
        PyrovaeError: the data cannot be read, or are not the data the run was trained on
            (naming where they were found and where the run's came from).
    """
    spec = run.spec if isinstance(run, Run) else run
    directory = run.path if isinstance(run, Run) else directory
    d = spec.data
    data = load_data(
        d.name,
        d.binarize,
        d.path,
        d.validation_size,
        d.limit,
        d.image_size,
        d.channels,
        listing=None if directory is None else read_listing(directory),
    )
    if spec.model.labels == "context":
        data = data.with_label_context(spec.model.classes)
    elif spec.model.labels == "latent":
        data = data.with_partial_labels(spec.model.classes, d.labels_per_class, d.labelled_share)
    expected = run.checkpoint.data_sha256 if isinstance(run, Run) else None
    if expected is not None:
        check_fingerprint(data, expected, run.path, d.path or d.name)
    return data


def read_listing(directory: Path) -> dict[str, list[str]] | None:
    """The run's ``images.json`` (see :data:`IMAGES`), None where it has none.

    Raises:
        PyrovaeError: the file is there but is not a listing.
    """
    file = Path(directory) / IMAGES
    if not file.is_file():
        return None
    try:
        listing = json.loads(file.read_text())
        files, classes = listing["files"], listing["classes"]
        if not all(isinstance(f, str) for f in files) or not all(
            isinstance(c, str) for c in classes
        ):
            raise ValueError("entries must be strings")
        if classes and not all(f.split("/")[0] in classes for f in files):
            raise ValueError("a file is in no listed class folder")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PyrovaeError(
            f"{file} is damaged ({e}); it lists the images {directory} was trained on, so "
            "restore it from a backup, or train a new run"
        ) from None
    return {"files": list(files), "classes": list(classes)}


def check_fingerprint(
    data: Splits, expected: str, path: Path, recorded: str | None, found: str | None = None
) -> None:
    """Refuses data whose fingerprint (``found``, computed if not given) is not the one run
    ``path`` recorded; ``recorded`` is where the run's data came from."""
    found = found or data.fingerprint()
    if found != expected:
        raise PyrovaeError(
            f"the data found at {data.source or 'the bundled data set'} are not the data "
            f"{path} was trained on (fingerprint {found[:12]} against {expected[:12]}; it was "
            f"trained on {recorded}); restore that file, or point data.path or PYROVAE_DATA at it"
        )

"""``moecl predict`` and the Python :class:`Predictor`: per image, the route taken and the top-k labels.

The route is decided per sample, so an image gets the same route and the same labels alone or in any batch:
DDAS reads the image's plain-CLIP features and sends it to the task whose autoencoder reconstructs it (under
that task's threshold), otherwise to zero-shot (the untouched CLIP). ``task=NAME`` forces that task's route
(zero-shot for a held-out or not yet trained task). Probabilities are ``softmax(logit_scale.exp() * cos)``
over the label set, whose class embeddings come from prompt-template ensembles through the text adapters of
the same route.

Label sets: the given open vocabulary (templates: the routed task's ensemble, ``a photo of a {}.`` for
zero-shot); else the named task's class names; else the class names of the routed task, and for zero-shot
images every class of every task of the sequence (held-out tasks included), each with its own task's prompts.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image

from ..errors import DataError, MoeclError
from ..routes import ZERO_SHOT
from .evaluator import routes_for
from .loading import LoadedRun, load_run
from .row import ORACLE, EvalMode

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".gif", ".tif", ".tiff")
OPEN_VOCAB_TEMPLATES = ("a photo of a {}.",)
ALL_SEEN = "all-seen"  # --labels all-seen: every class of every learned task, whatever the route
ImageInput = Union[Image.Image, str, Path]


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named directly, or found recursively (by suffix, sorted) in the given folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"folder {p} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        elif p.exists():
            raise DataError(f"image path {p} is not a regular file or folder")
        else:
            raise DataError(f"image path {p} does not exist")
    return found


def _labels_key(labels: Sequence[str], templates: Sequence[str]) -> str:
    return "open:" + hashlib.sha256(json.dumps([list(labels), list(templates)]).encode()).hexdigest()[:16]


class Predictor:
    """A trained run's checkpoint as a classifier: ``Predictor(RUN).predict([img, "x.png"], labels=[...])``."""

    def __init__(self, run_dir: str | Path, checkpoint: Optional[str | Path] = None, device: str = "auto", *,
                 data_root: Optional[str | Path] = None, sequence: Optional[str | Path] = None,
                 batch_size: Optional[int] = None, loaded: Optional[LoadedRun] = None):
        from .evaluator import Evaluator
        self.run = loaded or load_run(run_dir, checkpoint, device, data_root=data_root, sequence=sequence)
        self.batch_size = int(batch_size or self.run.cfg.eval.batch_size)
        # the deterministic test transform even where the run evaluates on training crops (eval.transform=train)
        self.tf = self.run.predict_tf or self.run.eval_tf
        self._ev = Evaluator(self.run.model, self.run.tokenizer, self.tf, device=self.run.device,
                             batch_size=self.batch_size, autocast=self.run.autocast)
        self._union: dict[tuple[int, bool], tuple[torch.Tensor, list[str]]] = {}

    # ---- label sets --------------------------------------------------------------------------------------
    @property
    def sequence(self):
        return self.run.sequence

    def _task_labels(self, name: str):
        from .evaluator import label_set
        return label_set(self.sequence.task(name), self.run.cfg.eval.templates)

    def _routed_task(self, route: int) -> Optional[str]:
        """The sequence task whose class names a routed image is scored against (moe-adapters routes only)."""
        if route < 0 or not self.run.method.per_task_routes or route >= len(self.run.trained_task_names):
            return None
        return self.run.trained_task_names[route]

    def seen_tasks(self) -> list:
        """The sequence tasks this checkpoint has learned, in training order."""
        names = self.run.trained_task_names[: self.run.num_trained_tasks]
        return [t for t in self.sequence.tasks if t.name in names]

    def _all_classes(self, route: int, seen_only: bool = False) -> tuple[torch.Tensor, list[str]]:
        """Every class of every task (+ held out; or only the learned tasks with ``seen_only``), each
        embedded with its own task's prompts, through ``route``."""
        if (route, seen_only) not in self._union:
            tasks = self.seen_tasks() if seen_only else self.sequence.all_tasks()
            if not tasks:
                raise DataError(f"--labels {ALL_SEEN}: {self.run.checkpoint} has learned no task yet")
            heads = [self._ev.head(self._task_labels(t.name), route) for t in tasks]
            names = [c for t in tasks for c in t.classnames]
            owners = [t.name for t in tasks for _ in t.classnames]
            dup = {n for n in names if names.count(n) > 1}
            names = [f"{n} ({o})" if n in dup else n for n, o in zip(names, owners)]
            self._union[(route, seen_only)] = (torch.cat(heads, dim=1), names)
        return self._union[(route, seen_only)]

    def head(self, route: int, labels: Optional[Sequence[str]], task: Optional[str],
             templates: Optional[Sequence[str]]) -> tuple[torch.Tensor, list[str], str]:
        """(class embeddings [D, C], label names, where the labels came from) for images on ``route``."""
        from .evaluator import LabelSet
        if labels == ALL_SEEN:
            w, names = self._all_classes(route, seen_only=True)
            return w, names, "all seen classes"
        if labels is not None:
            source_task = task or self._routed_task(route)
            tpl = list(templates) if templates else (self._task_labels(source_task).templates if source_task
                                                      else list(OPEN_VOCAB_TEMPLATES))
            ls = LabelSet(_labels_key(labels, tpl), list(labels), tpl)
            return self._ev.head(ls, route), list(labels), "open vocabulary"
        name = task or self._routed_task(route)
        if name is not None:
            ls = self._task_labels(name)
            if templates:
                ls = LabelSet(_labels_key(ls.classnames, templates), ls.classnames, list(templates))
            return self._ev.head(ls, route), list(ls.classnames), f"task {name}"
        w, names = self._all_classes(route)
        return w, names, "all classes"

    # ---- routing -----------------------------------------------------------------------------------------
    def forced_route(self, task: str) -> int:
        seq = self.sequence
        seq.task(task)  # a DataError listing the tasks when there is no such task
        return self.run.route_of(task, held_out=task in [t.name for t in seq.held_out])

    def mode(self, task: Optional[str]) -> tuple[EvalMode, int]:
        """How images are routed: the given task's oracle route, else DDAS per sample (when the run has it),
        else the method's default route (the dense adapter once trained, otherwise zero-shot)."""
        if task is not None:
            return ORACLE, self.forced_route(task)
        sel = self.run.selector
        if self.run.method.ddas and self.run.cfg.ddas.enabled and sel is not None and sel.num_tasks:
            return EvalMode("agnostic", "agnostic", sel, "sample"), ZERO_SHOT
        return ORACLE, self.run.method.default_route(self.run.num_trained_tasks)

    def routes(self, images: torch.Tensor, task: Optional[str]
               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Route per image, the plain-CLIP features and the DDAS errors [N, T] when DDAS routed (the
        evaluator's rule: :func:`moecl.evaluation.evaluator.routes_for`)."""
        mode, route = self.mode(task)
        routes, plain = routes_for(self.run.model, images, mode.kind, route, mode.selector, mode.decision)
        errors = None
        if mode.kind == "agnostic":
            errors = mode.selector.errors(images if getattr(mode.selector, "reads_images", False) else plain)
        return routes, plain, errors

    def _single_pass(self, images: torch.Tensor):
        """(features, routes, DDAS errors) from one forward when the run's selector reads the first adapted
        image block (ddas.feature=block); None otherwise."""
        sel, run = self.run.selector, self.run
        if not run.method.ddas or not run.cfg.ddas.enabled or sel is None:
            return None
        from ..ddas.block import single_pass
        return single_pass(run.model, images, sel, "sample")

    # ---- prediction --------------------------------------------------------------------------------------
    def _load(self, image: ImageInput) -> tuple[torch.Tensor, str]:
        return _load_image(image, self.tf)

    def _batches(self, images: Iterable[ImageInput], workers: int):
        """(loaded [(tensor, name)], unreadable [(name, reason)]) per batch of ``batch_size`` inputs: decoded by
        ``workers`` loader processes for a list of files, else here, one batch at a time from any iterable (a
        generator over a folder of any size); at most a few batches are held at once."""
        if workers > 0 and isinstance(images, (list, tuple)) and all(isinstance(i, (str, Path)) for i in images):
            from torch.utils.data import DataLoader
            loader = DataLoader(_ImageFiles(list(images), self.tf), batch_size=self.batch_size,
                                num_workers=workers, collate_fn=_split_unreadable, prefetch_factor=2)
            yield from loader
            return
        pending = iter(images)
        while True:
            chunk = list(itertools.islice(pending, self.batch_size))
            if not chunk:
                return
            yield _split_unreadable([_try_load(img, self.tf) for img in chunk])

    @torch.no_grad()
    def predict(self, images: Iterable[ImageInput], labels: Optional[Sequence[str]] = None,
                task: Optional[str] = None, top: int = 5,
                templates: Optional[Sequence[str]] = None,
                skipped: Optional[list[tuple[str, str]]] = None) -> list[dict[str, Any]]:
        """Per image: ``{"image", "route", "route_id", "labels_from", "top": [{"label", "probability"}...],
        "ddas_error"?}``. ``labels``: an open vocabulary; ``task``: route through that task and (without
        ``labels``) score its class names; neither: DDAS routes each image and it is scored against its
        routed task's classes (zero-shot: all classes of the sequence). ``labels="all-seen"``: every class
        of every learned task, whichever route an image takes (class-incremental use). ``skipped``: a list to
        receive ``(image, reason)`` for unreadable images, which are then left out instead of raising.
        :meth:`iter_predict` yields the same results batch by batch (bounded memory for many images)."""
        return [r for batch in self.iter_predict(images, labels, task, top, templates, skipped) for r in batch]

    @torch.no_grad()
    def iter_predict(self, images: Iterable[ImageInput], labels: Optional[Sequence[str]] = None,
                     task: Optional[str] = None, top: int = 5, templates: Optional[Sequence[str]] = None,
                     skipped: Optional[list[tuple[str, str]]] = None, workers: int = 0
                     ) -> Iterator[list[dict[str, Any]]]:
        """:meth:`predict`'s results, one list per batch of ``batch_size`` images, decoded by ``workers``
        loader processes. Each image runs the plain forward (DDAS reads it) and, when routed to a task, that
        route's forward; zero-shot images reuse the plain features."""
        if isinstance(labels, str) and labels == ALL_SEEN:
            if task is not None:
                raise ValueError(f"labels={ALL_SEEN!r} and task exclude each other")
        elif labels is not None:
            labels = [str(l).strip() for l in labels if str(l).strip()]
            if not labels:
                raise ValueError("labels is empty: give at least one label name")
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        if task is not None:
            self.forced_route(task)
        model, run = self.run.model, self.run
        scale = model.logit_scale.exp().float()
        start = 0
        for loaded, bad in self._batches(images, workers):
            for name, reason in bad:
                if skipped is None:
                    raise DataError(reason)
                skipped.append((name, reason))
            if not loaded:
                start += len(bad)
                continue
            x = torch.stack([t for t, _ in loaded]).to(run.device)
            with run.autocast():
                # issue 16 single-pass layout (ddas.feature=block): DDAS decides inside the one image forward
                one = self._single_pass(x) if task is None else None
                if one is not None:
                    feats, routes, errors = one
                else:
                    routes, plain, errors = self.routes(x, task)
                    feats = plain
                    routed = (routes >= 0).nonzero().flatten()
                    if routed.numel():  # the adapted forward only for the routed images
                        feats = plain.clone()
                        feats[routed] = model.encode_image(x[routed], routes[routed], normalize=True).float()
            rows: list[Optional[dict[str, Any]]] = [None] * len(loaded)
            for r in routes.unique().tolist():
                idx = (routes == r).nonzero().flatten()
                w, names, source = self.head(int(r), labels, task, templates)
                probs = (scale * feats[idx] @ w.to(feats.dtype)).softmax(dim=-1)
                p, k = probs.topk(min(top, len(names)), dim=-1)
                for i, pi, ki in zip(idx.tolist(), p.tolist(), k.tolist()):
                    rows[i] = {"image": loaded[i][1] or f"<image {start + i}>", "route": run.route_name(int(r)),
                               "route_id": int(r), "labels_from": source,
                               "top": [{"label": names[c], "probability": float(q)} for q, c in zip(pi, ki)]}
                    if errors is not None:
                        rows[i]["ddas_error"] = {run.route_name(t): float(e) for t, e in enumerate(errors[i].tolist())}
            start += len(loaded) + len(bad)
            yield rows  # type: ignore[misc]


def _load_image(image: ImageInput, tf) -> tuple[torch.Tensor, str]:
    from ..data import open_image
    if isinstance(image, Image.Image):
        return tf(image.convert("RGB")), str(getattr(image, "filename", "") or "")
    return tf(open_image(image)), str(image)


def _try_load(image: ImageInput, tf) -> tuple[Optional[torch.Tensor], str, Optional[str]]:
    """(tensor, name, None), or (None, name, reason) for an image that cannot be read (open_image names it)."""
    try:
        tensor, name = _load_image(image, tf)
        return tensor, name, None
    except (DataError, OSError, ValueError) as e:
        return None, str(image), str(e)


def _split_unreadable(items: list) -> tuple[list[tuple[torch.Tensor, str]], list[tuple[str, str]]]:
    return ([(t, n) for t, n, e in items if e is None], [(n, e) for t, n, e in items if e is not None])


class _ImageFiles(torch.utils.data.Dataset):
    """Image files for loader processes (each item decoded where it is read)."""

    def __init__(self, paths: list, tf):
        self.paths, self.tf = paths, tf

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return _try_load(self.paths[i], self.tf)


# ---------------------------------------------------------------------------------------------------------
# Files and the command line

def write_json(results: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """A text cell a spreadsheet will not run as a formula: one starting with = + - @ (or tab / CR) gets a
    leading apostrophe (OWASP's advice). Image names and labels come from other people's files."""
    text = str(text)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def write_csv(results: list[dict[str, Any]], path: str | Path, top: int) -> Path:
    """One row per image: image, route, then label_i / probability_i for i = 1..top (text cells escaped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    top = min(top, max((len(r["top"]) for r in results), default=0))  # top may exceed the label count
    header = ["image", "route", "labels_from"]
    for i in range(1, top + 1):
        header += [f"label_{i}", f"probability_{i}"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in results:
            cells = [csv_cell(r["image"]), csv_cell(r["route"]), csv_cell(r["labels_from"])]
            for t in r["top"]:
                cells += [csv_cell(t["label"]), f"{t['probability']:.6f}"]
            w.writerow(cells + [""] * (len(header) - len(cells)))
    return path


def _printable(text: str) -> str:
    """A name for the terminal: control characters (escape sequences, newlines) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def format_predictions(results: list[dict[str, Any]], top: int) -> str:
    from .report import format_table
    shown = max((len(r["top"]) for r in results), default=top)
    cols = ["route"] + [f"#{i}" for i in range(1, shown + 1)]
    rows = [[_printable(r["route"])] + [f"{_printable(t['label'])} {100 * t['probability']:.1f}%" for t in r["top"]]
            for r in results]
    names = [_printable(r["image"]) for r in results]
    common = _common_parent(names)
    if common:
        names = [n[len(common):] for n in names]
    return format_table(rows, names, cols, corner=f"image ({common})" if common else "image")


def _common_parent(names: list[str]) -> str:
    import os
    paths = [n for n in names if not n.startswith("<")]
    if len(paths) != len(names) or len(paths) < 2:
        return ""
    common = os.path.commonpath(paths)
    return common.rstrip(os.sep) + os.sep if common and common != os.sep else ""


MAX_TOP = 1000


MAX_SHOWN = 200  # rows of the console table (every row goes to --jsonl / --json / --csv)


def _open_jsonl(path: Optional[str]):
    """The --jsonl file, opened before any image is scored (an unwritable path fails at once)."""
    if not path:
        return None
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise MoeclError(f"cannot write --jsonl {path}: {e.strerror or e}") from None


def run_predict(args) -> int:
    top = getattr(args, "top", None)
    top = 5 if top is None else int(top)
    if not 1 <= top <= MAX_TOP:
        raise MoeclError(f"--top must be between 1 and {MAX_TOP} (labels shown per image), got {top}")
    images = find_images(args.images)
    labels = [l.strip() for l in args.labels.split(",") if l.strip()] if getattr(args, "labels", None) else None
    if labels == [ALL_SEEN]:
        labels = ALL_SEEN
    if getattr(args, "labels", None) is not None and not labels:
        raise DataError("--labels is empty: give comma-separated label names, e.g. --labels \"cat,dog\"")
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        raise MoeclError(f"--batch-size must be at least 1, got {batch_size}")
    workers = int(getattr(args, "workers", 0) or 0)
    if workers < 0:
        raise MoeclError(f"--workers must be at least 0, got {workers}")
    predictor = Predictor(args.run, getattr(args, "checkpoint", None), getattr(args, "device", None) or "auto",
                          batch_size=batch_size)
    skipped: list[tuple[str, str]] = []
    keep_all = bool(getattr(args, "json", None) or getattr(args, "csv", None))  # those files need every row
    results: list[dict[str, Any]] = []  # every row (--json / --csv), else the first MAX_SHOWN for the table
    counts: dict[str, int] = {}
    done = 0
    jsonl = _open_jsonl(getattr(args, "jsonl", None))
    bar = None
    if not getattr(args, "no_progress", False) and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(images), desc="predict", unit="image", dynamic_ncols=True, file=sys.stderr)
    try:
        for rows in predictor.iter_predict(images, labels=labels, task=getattr(args, "task", None), top=top,
                                           skipped=skipped, workers=workers):
            for r in rows:
                counts[r["route"]] = counts.get(r["route"], 0) + 1
                if jsonl is not None:
                    jsonl.write(json.dumps(r) + "\n")
            if keep_all or len(results) < MAX_SHOWN:
                results.extend(rows if keep_all else rows[: MAX_SHOWN - len(results)])
            done += len(rows)
            if jsonl is not None:
                jsonl.flush()
            if bar is not None:
                bar.update(min(predictor.batch_size, len(images) - bar.n))
    finally:
        if bar is not None:
            bar.close()
        if jsonl is not None:
            jsonl.close()
    if skipped:  # listed, as data_tools lists unreadable images; the readable ones are still predicted
        print(f"{len(skipped)} unreadable image(s) skipped:", file=sys.stderr)
        for name, reason in skipped:  # open_image's reason names the file already
            print("  " + _printable(reason if name in reason else f"{name}: {reason}"), file=sys.stderr)
    if not done:
        raise DataError(f"none of the {len(images)} image(s) could be read (listed above)")
    print(format_predictions(results[:MAX_SHOWN], top))
    if done > MAX_SHOWN:
        print(f"(the first {MAX_SHOWN} of {done} images shown; --jsonl / --json / --csv hold them all)")
    print(f"{done} image(s); routes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + (f"; {len(skipped)} unreadable skipped" if skipped else ""), file=sys.stderr)
    if getattr(args, "jsonl", None):
        print(f"wrote {args.jsonl}")
    for option, target, write in (("--json", getattr(args, "json", None), lambda p: write_json(results, p)),
                                  ("--csv", getattr(args, "csv", None), lambda p: write_csv(results, p, top))):
        if target:
            try:
                print(f"wrote {write(target)}")
            except OSError as e:  # a read-only folder, a directory in the way, a full disk
                raise MoeclError(f"cannot write {option} {target}: {e.strerror or e}") from None
    return 0

"""One subject's workdir and the jobs that run in it: ``rpo-jax train``, ``negatives``, ``eval``
and ``dreambench``.

The walk of ``rpo-jax train`` (:func:`train_and_evaluate`), which a reader can follow top down:

1. ``Job(config, workdir)``: check everything that can be checked before the workdir gets its
   first file (the config, the mesh against the devices, the folder specs, the config against
   ``workdir/config.json``: only the keys in :data:`rpo_jax.rpo.train.RESUMABLE_CHANGES` may
   differ once a checkpoint exists), then lock the workdir (:mod:`rpo_jax.core.workdir_lock`:
   one run per workdir, for the job's life), make the ``tiny:`` assets
   (:mod:`rpo_jax.jobs.assets`; the evaluation encoders' when first needed), check the pipeline
   folder and decode every reference photo, and only then write config.json (unless it is
   already identical: a finished run's read-only workdir is not written);
2. ``job.train()``: unless the run has finished, load the base pipeline and the reward model
   (once, in :class:`Models`), make or reuse the preference data
   (:func:`rpo_jax.rpo.preference.generate_negatives`; DreamBooth mode: the class images,
   :func:`rpo_jax.rpo.preference.generate_class_images`) and train with validation-based model
   selection (:func:`rpo_jax.rpo.train.train`) from that same pipeline and reward model;
3. ``job.report()``: the base pipeline and the selected UNet on the held-out prompts
   (:func:`rpo_jax.evaluation.heldout.evaluate`, same pipeline, same reward model, the
   evaluation encoders loaded once) → report.md, comparison.png, curves.png
   (:func:`rpo_jax.evaluation.report.write_report`). A finished run's report is shown, not
   recomputed.

A :class:`Models` can be shared by several jobs (DreamBench's subjects, the toy experiment's
arms), so a pipeline or encoder is read from disk once per process.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import ml_collections

from rpo_jax.core import fsutil, images as images_lib, logs, partitioning, workdir_lock
from rpo_jax.evaluation import dreambench, heldout, report as report_lib
from rpo_jax.jobs import assets
from rpo_jax.reward import encoders
from rpo_jax.rpo import preference, train as train_lib
from rpo_jax.sd.pipeline import check_pipeline_folder, load_pipeline

log = logs.get_logger(__name__)

CONFIG_FILE = "config.json"
# Config keys naming folders a job always needs, resolved when it starts; the optional ones
# (test.clip_model, test.dino_model, test.oracle) are resolved when first used.
PATH_KEYS = ("pretrained", "reward_model", "subject.reference_dir")
MIN_PHOTOS = 3  # the method expects 3-6 reference photos; fewer trains, with a warning


class Models:
    """Every model the jobs of one process use, each read from disk once per (folder, settings).

    ``loads`` counts the reads per kind, for tests and logs.
    """

    def __init__(self):
        self._cache: dict[tuple, Any] = {}
        self.loads: dict[str, int] = {}

    def _get(self, key: tuple, load: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = load()
            self.loads[key[0]] = self.loads.get(key[0], 0) + 1
        return self._cache[key]

    def pipeline(self, folder: Path, config) -> Any:
        """The Stable Diffusion folder with the config's dtype, attention kernel and remat (remat
        changes only the backward pass, so the same pipeline samples and trains)."""
        key = ("pipeline", Path(folder), config.dtype, config.attention_impl, bool(config.train.remat))
        return self._get(key, lambda: load_pipeline(
            folder, dtype=jnp.dtype(config.dtype), attention_impl=config.attention_impl,
            remat=config.train.remat))

    def dual_encoder(self, folder: Path) -> Any:
        """An ALIGN or CLIP folder as a :class:`rpo_jax.reward.encoders.DualEncoder`."""
        return self._get(("dual_encoder", Path(folder)), lambda: encoders.load_dual_encoder(folder))

    def dino(self, folder: Path) -> Any:
        return self._get(("dino", Path(folder)), lambda: encoders.load_dino_encoder(folder))


def _get(config, key: str) -> Any:
    """The value at dotted ``key``; "" where the config has no such key."""
    node = config
    for part in key.split("."):
        if part not in node:
            return ""
        node = node[part]
    return node


class Job:
    """A config and a workdir, with the specs resolved, the mesh built, the workdir locked and the
    models at hand. Use it as a context manager (or call :meth:`close`) to release the lock.

    Args:
      config: a locked ConfigDict of the schema in configs/common.py.
      workdir: the run's folder (created once everything is checked).
      models: shared :class:`Models` (a new one by default).
      record_config: check the config against ``workdir/config.json`` and write it (a training
        run's workdir); False for jobs that only read a workdir (eval) or only make negatives.

    Raises :class:`rpo_jax.core.workdir_lock.WorkdirBusy` when another run holds the workdir.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                 models: Models | None = None, record_config: bool = True):
        self.config = config
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", os.fspath(workdir)):
            raise ValueError(f"--workdir {os.fspath(workdir)}: URLs are not supported; give a folder "
                             "(on a pod, one every host sees: NFS, or a bucket mounted with gcsfuse)")
        self.workdir = Path(workdir).absolute()
        self.models = models if models is not None else Models()
        self.lock: workdir_lock.WorkdirLock | None = None
        # 1. what needs no file in the workdir
        if record_config:
            train_lib.check_config(config)
        else:
            preference.check_config(config)
        partitioning.rules_from_config(config.logical_axis_rules)  # fail early on bad rules
        self.mesh = partitioning.make_mesh(tuple(config.mesh))
        self.paths: dict[str, Path | None] = {}  # config key → folder, filled by path()
        self._check_folders(made_here=False)
        config_json = fsutil.jsonable(config)
        if record_config:
            self._check_recorded_config(config_json)
        # 2. the lock, the tiny: assets (made in the workdir) and their checks; then config.json
        self.lock = workdir_lock.WorkdirLock(self.workdir)
        try:
            self._check_folders(made_here=True)
            if record_config:
                self._record_config(config_json)
        except BaseException:
            self.close()
            raise

    def _check_folders(self, made_here: bool) -> None:
        """Resolve the PATH_KEYS folders made under the workdir (``tiny:``; ``made_here``) or the
        others, and check them: the pipeline folder's layout, every reference photo decoded."""
        for key in PATH_KEYS:
            if str(_get(self.config, key)).startswith("tiny:") != made_here:
                continue
            folder = self.path(key)
            if key == "pretrained":
                check_pipeline_folder(folder)
            elif key == "subject.reference_dir":
                check_photos(folder)

    def close(self) -> None:
        """Release the workdir lock (idempotent)."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def path(self, key: str) -> Path | None:
        """The folder config ``key`` names, resolved on first use (the evaluation encoders and
        judges only when something is evaluated); None for an empty optional key."""
        if key not in self.paths:
            spec = _get(self.config, key)
            self.paths[key] = (assets.resolve(spec, self.workdir / "assets", key)
                               if spec or key in PATH_KEYS else None)
        return self.paths[key]

    def _recorded_config(self) -> dict | None:
        path = self.workdir / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); move it away to start this workdir "
                             "afresh") from e

    def _check_recorded_config(self, config_json: dict) -> None:
        """Refuse a config that differs from the workdir's (beyond RESUMABLE_CHANGES) once the run
        has saved a checkpoint; before that (a failed first attempt) the new config replaces it."""
        old = self._recorded_config()
        diff = train_lib.config_diff(old, config_json) if old is not None else []
        if diff and train_lib.has_checkpoints(self.workdir):
            raise ValueError(f"{self.workdir} holds a run with a different config (keys {diff}); "
                             "resume with the same config or use a new --workdir")
        if diff:
            log.info(f"[job] {self.workdir / CONFIG_FILE}: replacing the config of an attempt that "
                     f"saved no checkpoint (keys {diff})")

    def _record_config(self, config_json: dict) -> None:
        """Write config.json unless it already holds exactly this config."""
        if self._recorded_config() != json.loads(json.dumps(config_json)):
            fsutil.write_json(config_json, self.workdir / CONFIG_FILE, sort_keys=True)

    # ---- the models, each loaded on first use ----------------------------------------------

    @property
    def pipeline(self):
        """The base pipeline (``pretrained``)."""
        return self.models.pipeline(self.paths["pretrained"], self.config)

    @property
    def reward_encoder(self):
        """The reward model (``reward_model``)."""
        return self.models.dual_encoder(self.paths["reward_model"])

    def judges(self) -> heldout.Judges:
        """The reward model and the evaluation encoders the config names."""
        clip, dino = self.path("test.clip_model"), self.path("test.dino_model")
        return heldout.Judges(reward=self.reward_encoder,
                              clip=self.models.dual_encoder(clip) if clip else None,
                              dino=self.models.dino(dino) if dino else None)

    # ---- the steps -------------------------------------------------------------------------

    def subject(self) -> preference.Subject:
        return preference.subject_from_config(self.config, self.paths["subject.reference_dir"])

    def class_images(self, progress: bool = True) -> dict:
        """DreamBooth mode: make (or reuse) ``workdir/class_images``; returns its manifest."""
        return preference.generate_class_images(
            self.pipeline, self.config.subject.class_noun, self.workdir,
            preference.class_images_settings(self.config),
            identity={"pretrained": preference.folder_fingerprint(self.paths["pretrained"])},
            mesh=self.mesh, progress=progress)

    def negatives(self, progress: bool = True) -> dict:
        """Make (or reuse) ``workdir/negatives``; returns its manifest."""
        pretrained, reward_dir = self.paths["pretrained"], self.paths["reward_model"]
        subject = self.subject()
        # by content, not place: a copied or moved workdir (with its tiny: assets) reuses them
        identity = {"pretrained": preference.folder_fingerprint(pretrained),
                    "reward_model": preference.folder_fingerprint(reward_dir)}
        return preference.generate_negatives(
            self.pipeline, self.reward_encoder, subject, self.workdir,
            preference.negatives_settings(self.config), identity=identity, mesh=self.mesh,
            progress=progress)

    def train(self, progress: bool = True) -> dict:
        """Train (or resume, or return a finished run's summary without loading anything)."""
        finished = train_lib.finished_summary(self.config, self.workdir)
        if finished is not None:
            log.info(f"[train] {self.workdir} already finished at step {finished['final_step']} (best "
                  f"validation reward {finished['best_reward']} at step {finished['best_step']}); "
                  "raise --config.train.max_steps to train further")
            return finished
        if self.config.objective.mode == "dreambooth":
            self.class_images(progress)
            data = preference.PreferenceData.from_class_images(self.workdir, self.subject())
        else:
            self.negatives(progress)
            data = preference.PreferenceData.load(self.workdir)
        return train_lib.train(self.config, self.workdir, pipe=self.pipeline,
                               encoder=self.reward_encoder, data=data, mesh=self.mesh,
                               progress=progress)

    def evaluate(self, *, pretrained: str | os.PathLike | None = None, base: bool = False,
                 label: str | None = None, lambda_val: float | None = None,
                 progress: bool = True) -> dict:
        """One model on the held-out prompts (``workdir/eval/<label>/``): the run's best UNet
        (with ``lambda_val``: the one selected at that λ of ``eval.lambda_sweep``), the base
        pipeline (``base``), or another pipeline folder / spec (``pretrained``)."""
        heldout.check_test_config(self.config)
        if (pretrained is not None or base) and lambda_val is not None:
            raise ValueError("lambda_val selects a checkpoint of the workdir's run: it does not "
                             "apply to a base pipeline (--pretrained)")
        label = label or heldout.default_label(base=base or pretrained is not None,
                                               lambda_val=lambda_val)
        if pretrained is not None:
            folder = assets.resolve(os.fspath(pretrained), self.workdir / "assets", "--pretrained")
            pipe = self.models.pipeline(folder, self.config)
            model = heldout.base_model(pipe, folder)
        elif base:
            pipe = self.pipeline
            model = heldout.base_model(pipe, self.paths["pretrained"])
        else:
            heldout.check_best(self.workdir, lambda_val)  # before loading anything
            pipe = self.pipeline
            model = heldout.best_model(pipe, self.workdir, lambda_val)
        return heldout.evaluate(self.config, self.workdir, pipe=pipe, model=model, label=label,
                                judges=self.judges(), reference_dir=self.paths["subject.reference_dir"],
                                mesh=self.mesh, progress=progress)

    def report(self, progress: bool = True) -> dict:
        """Base vs selected model on the held-out prompts → report.md, comparison.png, curves.png."""
        base = self.evaluate(base=True, label="base", progress=progress)
        best = self.evaluate(label="best", progress=progress)
        return report_lib.write_report(self.config, self.workdir, base=base, best=best,
                                       oracle_dir=self.path("test.oracle"), progress=progress)


def train_and_evaluate(config, workdir: str | os.PathLike, *, progress: bool = True,
                       models: Models | None = None) -> dict:
    """``rpo-jax train``: negatives → training → report (see the module docstring); returns the
    training summary. A run that had already finished, with its report written, shows the report
    instead of evaluating again."""
    with Job(config, workdir, models=models) as job:
        return _train_and_report(job, progress)


def _train_and_report(job: Job, progress: bool) -> dict:
    config = job.config
    already = train_lib.finished_summary(config, job.workdir) is not None
    summary = job.train(progress)
    if summary["interrupted"] or config.test.num_images < 1:
        return summary
    report_md = job.workdir / report_lib.REPORT_MD
    if already and (job.workdir / report_lib.REPORT_JSON).is_file() and report_md.is_file():
        log.info(f"[report] finished earlier ({job.workdir / report_lib.REPORT_JSON}); delete it to "
              f"evaluate again:\n\n{report_md.read_text()}")
        return summary
    job.report(progress)
    return summary


# ---- DreamBench --------------------------------------------------------------------------------

def run_dreambench(config, workdir: str | os.PathLike, dataset: str | os.PathLike, *,
                   subjects: Sequence[str] | None = None, host_index: int = 0, host_count: int = 1,
                   config_name: str | None = None, progress: bool = True) -> dict:
    """RPO on DreamBench: per subject, train (``workdir/subjects/<name>``) and evaluate its best
    UNet; then write the table and results of every finished subject. The pipeline and the
    encoders are loaded once for all subjects.

    ``dataset``: a DreamBench ``dataset/`` folder (or the repository root holding it), one
    sub-folder of photos per subject; classes from its prompts_and_classes.txt or the built-in
    table. ``subjects`` limits the run to these names. Host ``host_index`` of ``host_count``
    takes the subjects at sorted positions ``i % host_count == host_index`` (each host runs its
    subjects as independent single-host jobs). Subjects whose ``eval/best/scores.json`` exists
    are skipped, so re-running resumes. ``config_name`` (e.g. the config file) is named in the
    table. Returns the results dict (also in ``workdir/dreambench_results.json``), with
    ``interrupted`` set when a training run was stopped by SIGTERM.
    """
    if host_count < 1 or not 0 <= host_index < host_count:
        raise ValueError(f"need 0 <= --host-index < --host-count, got host {host_index} of {host_count}")
    heldout.check_test_config(config)
    workdir = Path(workdir).absolute()
    # Only names, classes and photo folders are needed: photos are listed, not decoded, here.
    folder, selected = dreambench.scan_dreambench(dataset, subjects=subjects)
    mine = [s for i, s in enumerate(selected) if i % host_count == host_index]
    log.info(f"[dreambench] {len(selected)} subject(s) in {folder}; host {host_index} of {host_count} "
          f"takes {len(mine)}: {', '.join(s.name for s in mine) or '-'}")
    models = Models()
    interrupted = False
    for n, s in enumerate(mine, 1):
        sub_workdir = workdir / heldout.SUBJECTS_DIR / s.name
        if heldout.scores_path(workdir, s.name).is_file():
            log.info(f"[dreambench] {n}/{len(mine)} {s.name}: skipped, already finished "
                  f"({heldout.scores_path(workdir, s.name)} exists)")
            continue
        log.info(f"[dreambench] {n}/{len(mine)} {s.name} ({s.class_noun}, "
              f"{'live' if s.live else 'object'}): training in {sub_workdir}")
        with Job(heldout.subject_config(config, s.name, s.class_noun, s.live, folder / s.name),
                 sub_workdir, models=models) as job:
            summary = job.train(progress)
            if summary["interrupted"]:
                log.info(f"[dreambench] {s.name}: training interrupted; re-run the same command to "
                         "resume")
                interrupted = True
                break
            job.evaluate(progress=progress)
    all_names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    results = heldout.write_summary(config, workdir, folder, all_names, config_name=config_name)
    results["interrupted"] = interrupted
    return results


def check_photos(folder: Path) -> None:
    """Decode every reference photo in ``folder`` (a bad one is a one-line error naming it) and
    warn, listing them, when there are fewer than :data:`MIN_PHOTOS` or links were skipped."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, paths = images_lib.load_reference_images(folder)
    for w in caught:
        log.warning(f"[photos] {w.message}")
    if len(paths) < MIN_PHOTOS:
        log.warning(f"[photos] {folder} holds {len(paths)} reference photo(s) "
                    f"({', '.join(p.name for p in paths)}); RPO expects 3-6 photos of the subject")


__all__ = ["Models", "Job", "train_and_evaluate", "run_dreambench", "PATH_KEYS"]

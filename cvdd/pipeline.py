"""The main job (`cvdd run`): committee, priors, synthesis, post-evaluation and metrics.

Every stage reads the previous stage's artifacts from the run folder and skips work
items whose outputs exist and were made with the same config.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from . import distributed
from .config import RunConfig, fingerprint, hash_view, without_label_store
from .data import ImageDataset, SubsetSplit, stratified_split
from .evaluate import Committee, check_class_names, train_student
from .metrics import shared_setting, shared_setting_line
from .prior import load_or_compute_priors
from .runs import RunFolder, ValidationFolder, atomic_write_json, peak_rss_bytes, read_json, stage
from .synthesis import distill, random_subset
from .train import (
    build_context, load_committee, member_fingerprint, pretrain_committee, seed_for, worker_config_data, workers_for,
)
from .voting import prior_weights

log = logging.getLogger(__name__)


def load_distilled(run: RunFolder, method: str) -> dict:
    path = run.distilled_dir(method) / "images.pt"
    if not path.is_file():
        from .errors import CvddError

        raise CvddError(f"no distilled set for method {method!r} at {str(path)!r}; run `cvdd distill` first")
    return torch.load(path, weights_only=False)


def member_ids(cfg: RunConfig, dataset: ImageDataset, run: RunFolder) -> dict[str, str]:
    """Fingerprint of each member checkpoint, so a retrained member invalidates what it made."""
    if isinstance(run, ValidationFolder):
        ids = {}
        for arch in cfg.committee.members:
            payload = torch.load(run.member_path(arch), map_location="cpu", weights_only=False)
            ids[arch] = payload["config"]["fingerprint"]
        return ids
    return {m: member_fingerprint(cfg, dataset, m) for m in cfg.committee.members}


def split_indices(cfg: RunConfig, dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1's split of the training rows: (rows to distil from, held-out rows to test on)."""
    return stratified_split(dataset.train.labels, cfg.prior.train_fraction, cfg.prior.split_seed)


def run_synthesis(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, device, priors: dict,
                  methods: list[str], callback=None) -> dict[str, dict]:
    """Distil with every method in `methods`; the random subset is drawn, not optimised.

    In a validation folder the real images come from Algorithm 1's training rows only.
    """
    committee = None
    outputs = {}
    ids = member_ids(cfg, dataset, run)
    train_indices = split_indices(cfg, dataset)[0] if isinstance(run, ValidationFolder) else None
    for method in methods:
        out_dir = run.distilled_dir(method)
        if method == "random":
            # Rank 0 draws and writes the subset; the other ranks wait, then read that file back.
            if distributed.is_main():
                outputs[method] = random_subset(dataset, cfg.synthesis.ipc, cfg.seed, out_dir,
                                                train_indices=train_indices)
            distributed.barrier()
            if not distributed.is_main():
                outputs[method] = random_subset(dataset, cfg.synthesis.ipc, cfg.seed, out_dir,
                                                train_indices=train_indices)
            continue
        if committee is None:
            committee = load_committee(cfg, dataset, run, device)
        outputs[method] = distill(method, committee, priors, dataset, cfg.synthesis, out_dir, device,
                                  seed=cfg.seed, single_member=cfg.single_member, callback=callback,
                                  member_ids=ids, train_indices=train_indices, flip=cfg.train.flip)
        log.info("distilled %d images with %s in %.1f s", len(outputs[method]["images"]), method,
                 outputs[method]["seconds"])
    return outputs


def teachers_for(method: str, cfg: RunConfig, committee: dict, priors: dict) -> Committee:
    """The soft-label teachers of a method.

    sre2l and sre2l++ relabel with their single member. cvdd and the random subset relabel
    with the whole committee weighted by softmax(alpha / T), so the random subset is judged
    under exactly the protocol of the method it is compared with.
    """
    if method in ("sre2l", "sre2l++"):
        name = cfg.single_member
        return Committee({name: committee[name]}, torch.ones(1), [])
    names = list(committee)
    weights = prior_weights([priors[n] for n in names], cfg.synthesis.temperature)
    return Committee(dict(committee), weights, [])


def _evaluation_jobs(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, priors: dict, methods: list[str],
                     committee: dict) -> list[dict]:
    """List every (method, student, label mode, seed) item with its output path and fingerprint."""
    width = cfg.evaluate.student_width or cfg.committee.width
    ids = member_ids(cfg, dataset, run)
    jobs = []
    for method in methods:
        distilled = load_distilled(run, method)
        check_class_names(distilled, dataset)
        teachers = teachers_for(method, cfg, committee, priors)
        for student in cfg.evaluate.students:
            for mode in cfg.evaluate.label_modes:
                stored = mode == "soft" and cfg.evaluate.labels == "stored"
                eval_cfg = method_eval_config(cfg, method)
                if not stored:
                    eval_cfg = without_label_store(eval_cfg)
                for seed in cfg.evaluate.seeds:
                    # Only the flip-free case adds a part, so results made with flips keep their keys.
                    key_parts = [distilled["fingerprint"], eval_cfg, student, width, mode, seed,
                                 list(teachers.teachers), teachers.weights.tolist(),
                                 {m: ids[m] for m in teachers.teachers}, *([] if cfg.train.flip else ["no flip"])]
                    # Stored-label results get their own files, so both kinds of result can stand side by side.
                    path = run.eval_path(method, student, "soft-stored" if stored else mode, seed)
                    jobs.append({"method": method, "student": student, "mode": mode, "seed": seed,
                                 "key": result_key(key_parts), "key_parts": key_parts, "path": str(path),
                                 "stored": stored})
    return jobs


# Evaluation settings that choose which students run, not how one student trains.
JOB_LIST_KEYS = ("seeds", "students", "label_modes")


def result_key(key_parts: list) -> str:
    """Fingerprint one student's result from what its training reads.

    The lists of seeds, students and label modes are left out, so a variant that runs fewer
    seeds or other students reuses the results it shares with the base run. A hard-label
    student never uses a teacher, so evaluate.bssl is left out of its key too.
    """
    eval_cfg, mode = key_parts[1], key_parts[4]
    dropped = JOB_LIST_KEYS + (("bssl",) if mode == "hard" else ())
    eval_part = {k: v for k, v in hash_view(eval_cfg).items() if k not in dropped}
    return fingerprint(key_parts[0], eval_part, *key_parts[2:])


def _earlier_result_key(key_parts: list, saved: dict) -> str | None:
    """Compute the key of a result written before result_key existed, from the lists it records.

    Those results were keyed on the whole evaluation config, job lists included.
    """
    import dataclasses

    recorded = saved.get("protocol", {}).get("config", {})
    if not all(k in recorded for k in JOB_LIST_KEYS):
        return None
    eval_cfg = dataclasses.replace(key_parts[1], **{k: list(recorded[k]) for k in JOB_LIST_KEYS})
    if key_parts[4] == "hard":
        eval_cfg = dataclasses.replace(eval_cfg, bssl=bool(recorded.get("bssl", eval_cfg.bssl)))
    return fingerprint(key_parts[0], eval_cfg, *key_parts[2:])


def _saved_result(job: dict) -> dict | None:
    """Return the result file of `job` when it was made with the job's settings, else None."""
    path = Path(job["path"])
    if not path.is_file():
        return None
    saved = read_json(path)
    if saved.get("fingerprint") in (job["key"], _earlier_result_key(job["key_parts"], saved)):
        return saved
    return None


def label_store_path(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, method: str, priors: dict,
                     committee: dict) -> Path:
    """Return the label store path of a method's distilled set under the current teachers and augmentation seed."""
    ids = member_ids(cfg, dataset, run)
    distilled = load_distilled(run, method)
    teachers = teachers_for(method, cfg, committee, priors)
    eval_part = {k: v for k, v in hash_view(method_eval_config(cfg, method)).items()
                 if k not in ("seeds", "students", "label_modes", "eval_every", "labels")}
    key = fingerprint("labels", distilled["fingerprint"], eval_part, list(teachers.teachers),
                      teachers.weights.tolist(), {m: ids[m] for m in teachers.teachers}, cfg.train.flip,
                      cfg.evaluate.augment_seed, cfg.evaluate.label_top_k)
    return run.root / "labels" / method / f"{key}.pt"


def ensure_label_stores(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, device, priors: dict,
                        committee: dict, methods: list[str]) -> dict[str, Path]:
    """Build the label store of every method that lacks one (rank 0 under torchrun); return their paths."""
    from .evaluate import check_class_names
    from .labels import build_label_store

    paths = {}
    for method in methods:
        path = label_store_path(cfg, dataset, run, method, priors, committee)
        paths[method] = path
        if path.is_file() or not distributed.is_main():
            continue
        distilled = load_distilled(run, method)
        check_class_names(distilled, dataset)
        store = build_label_store(distilled["images"], dataset, method_eval_config(cfg, method),
                                  teachers_for(method, cfg, committee, priors), cfg.train.flip,
                                  cfg.evaluate.augment_seed, cfg.evaluate.label_top_k, device, path.stem,
                                  desc=f"labels {method}")
        store.save(path)
    distributed.barrier()
    return paths


def method_eval_config(cfg: RunConfig, method: str):
    """SRe2L relabels with running BN statistics; every later method uses BSSL."""
    if method == "sre2l" and cfg.evaluate.bssl:
        import dataclasses

        return dataclasses.replace(cfg.evaluate, bssl=False)
    return cfg.evaluate


def _run_job(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, device, priors: dict, committee: dict,
             job: dict) -> dict:
    distilled = load_distilled(run, job["method"])
    teachers = teachers_for(job["method"], cfg, committee, priors)
    width = cfg.evaluate.student_width or cfg.committee.width
    # A validation run tests on the rows Algorithm 1 held out, never on the test split.
    test_split = SubsetSplit(dataset.train, split_indices(cfg, dataset)[1]) if isinstance(run, ValidationFolder) else None
    stored = None
    if job.get("stored"):
        from .labels import LabelStore

        stored = LabelStore.load(label_store_path(cfg, dataset, run, job["method"], priors, committee))
    ddp = cfg.ddp and distributed.active()
    result = train_student(
        distilled["images"], distilled["labels"], dataset, method_eval_config(cfg, job["method"]), job["student"],
        width, device, seed_for(job["seed"], "student", job["method"], job["student"]), committee=teachers,
        label_mode=job["mode"], desc=f"{job['method']} {job['student']} {job['mode']} seed {job['seed']}",
        test_split=test_split, flip=cfg.train.flip, stored=stored, ddp=ddp,
    )
    # "seed" is the evaluation seed of the config; the student's derived torch seed is kept beside it.
    result.update({"method": job["method"], "ipc": int(distilled["ipc"]), "fingerprint": job["key"],
                   "seed": job["seed"], "torch_seed": result["seed"]})
    if not ddp or distributed.is_main():
        atomic_write_json(job["path"], result)
    return result


def _evaluation_job(context: dict, job: dict) -> dict:
    committee = context.get("committee")
    if committee is None:
        committee = context["committee"] = load_committee(context["cfg"], context["dataset"], context["run"],
                                                          context["device"])
    return _run_job(context["cfg"], context["dataset"], context["run"], context["device"], context["priors"],
                    committee, job)


def _evaluation_context(cfg_data: dict, priors: dict) -> dict:
    context = build_context(cfg_data)
    context["priors"] = priors
    return context


def run_evaluation(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, device, priors: dict,
                   methods: list[str]) -> list[dict]:
    """Train every student, seed and label mode on every method's distilled set.

    Items whose result file exists with the same fingerprint are read back, not retrained.
    With `workers` above 1 on the CPU, the remaining items train in that many processes
    of one thread each (see cvdd.parallel).
    """
    from .parallel import map_jobs

    committee = load_committee(cfg, dataset, run, device)
    jobs = _evaluation_jobs(cfg, dataset, run, priors, methods, committee)
    done: dict[str, dict] = {}
    pending = []
    for job in jobs:
        saved = _saved_result(job)
        if saved is not None:
            saved["seed"] = job["seed"]
            done[job["path"]] = saved
            continue
        pending.append(job)
    if pending:
        log.info("post-evaluation: %d of %d items to train (%d reused)", len(pending), len(jobs), len(done))

    def report(result):
        log.info("%s / %s / %s label / seed %d: final top-1 %.4f (best %.4f at epoch %d)", result["method"],
                 result["student"], result["label_mode"], result["seed"], result["top1"], result["best_top1"],
                 result["best_epoch"])

    stored_methods = sorted({job["method"] for job in pending if job["stored"]})
    if stored_methods:
        ensure_label_stores(cfg, dataset, run, device, priors, committee, stored_methods)
    context = {"cfg": cfg, "dataset": dataset, "run": run, "device": device, "priors": priors,
               "committee": committee}
    if cfg.ddp and distributed.active():
        # Every rank takes part in every student (DistributedDataParallel); rank 0 writes the files.
        distributed.barrier()
        trained = [_evaluation_job(context, job) for job in pending]
        distributed.barrier()
    else:
        trained = map_jobs(_evaluation_job, pending, _evaluation_context, (worker_config_data(cfg, run), priors),
                           workers_for(cfg, device), in_process_context=context, log_file=run.log_path)
    for job, result in zip(pending, trained):
        done[job["path"]] = result
        report(result)
    return [done[job["path"]] for job in jobs]


def summarize(results: list[dict], cfg: RunConfig, dataset: ImageDataset, priors: dict,
              timings: dict, peaks: dict | None = None) -> dict:
    """Build metrics.json: mean and sample standard deviation over seeds per method, student, mode."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["student"], r["label_mode"]), []).append(r)
    rows = []
    for (method, student, mode), items in groups.items():
        items = sorted(items, key=lambda r: r["seed"])
        top1 = [r["top1"] for r in items]
        best = [r["best_top1"] for r in items]
        rows.append({
            "method": method, "student": student, "ipc": items[0]["ipc"], "label_mode": mode,
            "top1_mean": statistics.fmean(top1), "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "top1_per_seed": top1, "best_top1_mean": statistics.fmean(best), "seeds": [r["seed"] for r in items],
        })
    return {
        "dataset": dataset.name, "ipc": cfg.synthesis.ipc, "results": rows,
        "priors": priors, "temperature": cfg.synthesis.temperature,
        "std": "sample standard deviation over seeds (ddof=1)",
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "stage_peak_rss_bytes": peaks or {},
        "peak_rss_bytes": peak_rss_bytes(),
    }


STANDARD_ROW_KEYS = ("method", "student", "ipc", "label_mode", "top1_mean", "top1_std", "top1_per_seed",
                     "best_top1_mean", "seeds", "variant")


def row_setting(row: dict) -> str:
    """Describe the varied settings of an ablation row ("temperature=1"), or "" for a plain row."""
    return ", ".join(f"{k}={v}" for k, v in row.items() if k not in STANDARD_ROW_KEYS)


def _setting_text(row: dict) -> str:
    """Format the setting cell of a results row: the variant's name, then its varied settings."""
    variant, setting = row.get("variant", ""), row_setting(row)
    return f"{variant} ({setting})" if variant and setting else variant or setting


def format_results(metrics: dict) -> str:
    where = "test top-1"
    if metrics.get("validation"):
        where = f"top-1 on {metrics['validation']['held_out_rows']} held-out training rows, validation"
    lines = [f"Results on {metrics['dataset']} at IPC {metrics['ipc']} (final-epoch {where}, mean ± std over seeds)"]
    table: dict[tuple, dict] = {}
    for row in metrics["results"]:
        table.setdefault((row["method"], row["student"], _setting_text(row)), {})[row["label_mode"]] = row
    settings = [setting for _, _, setting in table]
    shared = shared_setting(settings)
    with_setting = any(settings) and not shared
    if with_setting:
        lines += ["| method | student | setting | soft label | hard label |", "|---|---|---|---|---|"]
    else:
        lines += ["| method | student | soft label | hard label |", "|---|---|---|---|"]
    for (method, student, setting), modes in table.items():
        cells = []
        for mode in ("soft", "hard"):
            r = modes.get(mode)
            cells.append(f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f}" if r else "-")
        middle = f" {setting} |" if with_setting else ""
        lines.append(f"| {method} | {student} |{middle} {cells[0]} | {cells[1]} |")
    if shared:
        # The blank line ends the markdown table, because a text line right after it would be read as a row.
        lines += ["", shared_setting_line(shared)]
    if metrics.get("priors"):
        lines.append("priors (%): " + ", ".join(f"{k} {v:.2f}" for k, v in metrics["priors"].items()))
    return "\n".join(lines)


def run_pipeline(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, device, callback=None) -> dict:
    """Run every stage of `cfg` in `run` and write metrics.json (validation/metrics.json in validation mode)."""
    if cfg.validation:
        return run_validation(cfg, dataset, run, device, callback)
    timings: dict = {}
    peaks: dict = {}
    with stage("committee", timings):
        pretrain_committee(cfg, dataset, run, device)
    peaks["committee"] = peak_rss_bytes()
    priors: dict = {}
    if any(m in cfg.methods for m in ("cvdd", "random")):
        with stage("prior", timings):
            priors = load_or_compute_priors(cfg, dataset, run, device)
        peaks["prior"] = peak_rss_bytes()
    results = _distil_and_evaluate(cfg, dataset, run, device, priors, timings, peaks, callback)
    metrics = summarize(results, cfg, dataset, priors, timings, peaks)
    metrics["real_hard"] = real_hard_reference(cfg, run)
    metrics["stage_history"] = _stage_history(run, metrics)
    atomic_write_json(run.metrics_path, metrics)
    return metrics


def _stage_history(run: RunFolder, metrics: dict) -> list[dict]:
    """Stage seconds and peak memory of every run that produced these same results, oldest first.

    A rerun reuses finished work and takes seconds, so the run that did the work is kept.
    """
    entry = {"stage_seconds": metrics["stage_seconds"], "stage_peak_rss_bytes": metrics["stage_peak_rss_bytes"]}
    if not run.metrics_path.is_file():
        return [entry]
    previous = read_json(run.metrics_path)
    if previous.get("results") != metrics["results"]:
        return [entry]
    history = previous.get("stage_history") or [{"stage_seconds": previous.get("stage_seconds", {}),
                                                 "stage_peak_rss_bytes": previous.get("stage_peak_rss_bytes", {})}]
    return history + [entry]


def real_hard_reference(cfg: RunConfig, run: RunFolder) -> dict:
    """Test top-1 of each student architecture trained on all real training images, where known.

    A committee member of the student's architecture and width was trained with hard labels
    on the whole training split, so its accuracy replaces acc(real, hard) in HLR.
    NOTE: it follows the committee's training recipe, not the student's post-evaluation protocol.
    """
    width = cfg.evaluate.student_width or cfg.committee.width
    reference = {}
    for student in cfg.evaluate.students:
        if student in cfg.committee.members and cfg.member_width(student) == width and run.member_path(student).is_file():
            payload = torch.load(run.member_path(student), map_location="cpu", weights_only=False)
            reference[student] = {"top1": float(payload["accuracy"]), "source": f"committee member {student}"}
    return reference


def _distil_and_evaluate(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, device, priors: dict,
                         timings: dict, peaks: dict, callback) -> list[dict]:
    """Run the synthesis and evaluation stages, recording their seconds and peak memory."""
    with stage("synthesis", timings):
        run_synthesis(cfg, dataset, run, device, priors, list(cfg.methods), callback=callback)
    peaks["synthesis"] = peak_rss_bytes()
    with stage("evaluate", timings):
        results = run_evaluation(cfg, dataset, run, device, priors, list(cfg.methods))
    peaks["evaluate"] = peak_rss_bytes()
    return results


def run_validation(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, device, callback=None) -> dict:
    """Run the pipeline on Algorithm 1's split, for choosing settings without the test split.

    Algorithm 1 trains each member on prior.train_fraction of the training rows. Here those
    members distil (real images from the same rows) and label, and students are tested on
    the held-out rows. Results go to <run>/validation/metrics.json, next to the run's own.
    """
    timings: dict = {}
    peaks: dict = {}
    with stage("prior", timings):
        priors = load_or_compute_priors(cfg, dataset, run, device)
    peaks["prior"] = peak_rss_bytes()
    validation = ValidationFolder(run).create()
    results = _distil_and_evaluate(cfg, dataset, validation, device, priors, timings, peaks, callback)
    metrics = summarize(results, cfg, dataset, priors, timings, peaks)
    train_rows, held_out = split_indices(cfg, dataset)
    metrics["validation"] = {"members": "Algorithm 1's members", "train_rows": len(train_rows),
                             "held_out_rows": len(held_out), "split_seed": cfg.prior.split_seed}
    atomic_write_json(validation.metrics_path, metrics)
    return metrics

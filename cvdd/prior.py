"""Prior performance by distill-and-evaluate (Algorithm 1, `cvdd prior`).

For each member: split the training set 80/20 with a seed, train the member on the 80%,
distil a set with that member alone under SRe2L++ settings at a fixed IPC (the same for
every member), train a fresh student on it with KL to that member, and take the
student's top-1 on the 20%, in percent, as the member's prior alpha.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from .config import RunConfig, SynthesisConfig, without_label_store, config_to_dict, fingerprint, hash_view
from .data import ImageDataset, SubsetSplit, stratified_split
from .evaluate import Committee, train_student
from .models import checkpoint_payload, create_model, load_checkpoint
from .runs import RunFolder, atomic_torch_save, atomic_write_json, read_json
from .synthesis import distill
from .train import seed_for, train_model

log = logging.getLogger(__name__)

# Synthesis keys that only CV-DD reads.
CVDD_ONLY_KEYS = ("member", "experts", "temperature", "voter", "online_reweighting", "partial_aggregation", "draw",
                  "callback_every")


def prior_fingerprint(cfg: RunConfig, dataset: ImageDataset) -> str:
    """Identify the settings that priors.json depends on (not the main run's seeds or students)."""
    _, _, synthesis_cfg, eval_cfg = _prior_settings(cfg, dataset)
    eval_part = {k: v for k, v in hash_view(eval_cfg).items() if k not in ("seeds", "students", "label_modes")}
    members = {m: (cfg.member_width(m), hash_view(cfg.member_train(m))) for m in cfg.committee.members}
    # Only the flip-free case adds a part, so priors computed with flips keep their keys.
    no_flip = [] if cfg.train.flip else ["no flip"]
    return fingerprint("prior", cfg.prior, members, synthesis_cfg, eval_part, dataset.identity, cfg.seed, *no_flip)


def read_saved_priors(cfg: RunConfig, dataset: ImageDataset, run: RunFolder) -> dict[str, float] | None:
    """Return {member: alpha} from a priors.json made with the current settings, or None."""
    if not run.priors_path.is_file():
        return None
    saved = read_json(run.priors_path)
    alpha = saved.get("alpha", {})
    if saved.get("fingerprint") != prior_fingerprint(cfg, dataset):
        return None
    if not all(m in alpha for m in cfg.committee.members):
        return None
    return {m: float(alpha[m]) for m in cfg.committee.members}


def load_or_compute_priors(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, device,
                           compute: bool = True) -> dict[str, float]:
    """Return {member: alpha in percent} from the config, from priors.json, or computed now.

    Priors given in `prior.values` take precedence and the log says so. Otherwise a
    priors.json made with the same settings is reused. With `compute=False` a missing
    priors.json is an error.
    """
    members = cfg.committee.members
    if cfg.prior.values:
        log.info("using the priors given in the config (prior.values), not computing them: %s",
                 {m: cfg.prior.values[m] for m in members})
        return {m: float(cfg.prior.values[m]) for m in members}
    saved = read_saved_priors(cfg, dataset, run)
    if saved is not None:
        log.info("reusing priors from %s: %s", run.priors_path, saved)
        for arch in members:
            _save_member_alpha(cfg, dataset, run, arch, saved[arch], None)
        return saved
    if not compute and run.priors_path.is_file():
        log.warning("priors.json in %s was made with other settings", run.root)
    if not compute:
        from .errors import CvddError

        raise CvddError(
            f"no prior for member(s) {members} and no matching priors.json in {str(run.root)!r}; "
            "run `cvdd prior` first or set prior.values"
        )
    return compute_priors(cfg, dataset, run, device)["alpha"]


def _prior_settings(cfg: RunConfig, dataset: ImageDataset):
    pcfg = cfg.prior
    train_idx, eval_idx = stratified_split(dataset.train.labels, pcfg.train_fraction, pcfg.split_seed)
    # Algorithm 1 distils with one member (sre2l++), so CV-DD's own keys are reset to their defaults
    # and a variant that changes only them (T, N, the voter) reuses the priors.
    cvdd_only = {f.name: f.default for f in dataclasses.fields(SynthesisConfig) if f.name in CVDD_ONLY_KEYS}
    synthesis_cfg = dataclasses.replace(cfg.synthesis, ipc=pcfg.ipc,
                                        iterations=pcfg.iterations or cfg.synthesis.iterations, **cvdd_only)
    # The prior's students label on the fly: how the main run stores its labels does not change
    # Algorithm 1, so a run with stored labels reuses the priors.
    eval_cfg = dataclasses.replace(without_label_store(cfg.evaluate), epochs=pcfg.student_epochs or cfg.evaluate.epochs,
                                   eval_every=pcfg.student_epochs or cfg.evaluate.epochs, bssl=pcfg.bssl)
    return train_idx, eval_idx, synthesis_cfg, eval_cfg


def _prior_member_train(cfg: RunConfig, dataset: ImageDataset, arch: str):
    """Return the training settings and the fingerprint of the member Algorithm 1 trains on its split."""
    member_cfg = cfg.member_train(arch)
    # A member whose committee.train entry sets its epochs (an overfitted copy) keeps them here.
    if cfg.prior.member_epochs is not None and "epochs" not in cfg.committee.train.get(arch, {}):
        member_cfg = dataclasses.replace(member_cfg, epochs=cfg.prior.member_epochs)
    member_key = fingerprint("prior-member", arch, cfg.member_width(arch), member_cfg, dataset.identity,
                             cfg.prior.train_fraction, cfg.prior.split_seed, cfg.seed)
    return member_cfg, member_key


def _member_alpha_key(cfg: RunConfig, dataset: ImageDataset, arch: str) -> str:
    """Identify one member's prior alone, so that another committee holding the member reuses it."""
    _, _, synthesis_cfg, eval_cfg = _prior_settings(cfg, dataset)
    eval_part = {k: v for k, v in hash_view(eval_cfg).items() if k not in ("seeds", "students", "label_modes")}
    _, member_key = _prior_member_train(cfg, dataset, arch)
    return fingerprint("prior-alpha", member_key, cfg.prior, synthesis_cfg, eval_part,
                       cfg.evaluate.student_width or cfg.committee.width, cfg.train.flip)


def _member_alpha_path(run: RunFolder, arch: str):
    return run.root / "prior" / "alpha" / f"{arch}.json"


def _saved_member_alpha(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, arch: str) -> dict | None:
    path = _member_alpha_path(run, arch)
    if not path.is_file():
        return None
    saved = read_json(path)
    return saved if saved.get("fingerprint") == _member_alpha_key(cfg, dataset, arch) else None


def _save_member_alpha(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, arch: str, alpha: float,
                       seconds: float | None) -> None:
    if _saved_member_alpha(cfg, dataset, run, arch) is None:
        atomic_write_json(_member_alpha_path(run, arch), {
            "member": arch, "alpha": alpha, "seconds": seconds,
            "fingerprint": _member_alpha_key(cfg, dataset, arch)})


def _prior_member(context: dict, arch: str) -> dict:
    """Algorithm 1 for one member: train on the 80%, distil alone, train a student, test on the 20%."""
    cfg, dataset, run, device = context["cfg"], context["dataset"], context["run"], context["device"]
    saved = _saved_member_alpha(cfg, dataset, run, arch)
    if saved is not None:
        log.info("prior of %s: alpha = %.2f%% reused from %s", arch, saved["alpha"], _member_alpha_path(run, arch))
        return {"alpha": saved["alpha"], "seconds": saved["seconds"] or 0.0, "reused": True}
    pcfg = cfg.prior
    train_idx, eval_idx, synthesis_cfg, eval_cfg = _prior_settings(cfg, dataset)
    student_width = cfg.evaluate.student_width or cfg.committee.width
    start = time.perf_counter()
    member_cfg, member_key = _prior_member_train(cfg, dataset, arch)
    path = run.root / "prior" / "committee" / f"{arch}.pt"
    model = None
    if path.is_file():
        model, meta = load_checkpoint(path, dataset)
        if meta["config"].get("fingerprint") != member_key:
            model = None
    if model is None:
        torch.manual_seed(seed_for(cfg.seed, "prior-init", arch))
        model = create_model(arch, dataset.num_classes, dataset.channels, dataset.image_size, cfg.member_width(arch))
        train_model(model, dataset, member_cfg, device, seed_for(cfg.seed, "prior-train", arch),
                    indices=train_idx, desc=f"prior {arch}", state_path=path.with_suffix(".partial.pt"),
                    state_key=member_key)
        payload = checkpoint_payload(model, arch=arch, width=cfg.member_width(arch), dataset=dataset,
                                     accuracy=None, config={"fingerprint": member_key,
                                                            "train": config_to_dict(member_cfg)})
        atomic_torch_save(payload, path)
        path.with_suffix(".partial.pt").unlink(missing_ok=True)
    model.to(device).eval().requires_grad_(False)

    distilled = distill("sre2l++", {arch: model}, {}, dataset, synthesis_cfg,
                        run.root / "prior" / "distilled" / arch, device, seed=cfg.seed,
                        single_member=arch, member_ids={arch: member_key}, train_indices=train_idx,
                        flip=cfg.train.flip)
    committee = Committee({arch: model}, torch.ones(1), list(dataset.class_names))
    result = train_student(distilled["images"], distilled["labels"], dataset, eval_cfg, pcfg.student,
                           student_width, device, seed_for(cfg.seed, "prior-student", arch),
                           committee=committee, label_mode="soft", test_split=SubsetSplit(dataset.train, eval_idx),
                           desc=f"prior student {arch}", flip=cfg.train.flip)
    alpha = 100.0 * result["top1"]
    log.info("prior of %s: alpha = %.2f%% (student %s on the held-out %d images)", arch, alpha,
             pcfg.student, len(eval_idx))
    seconds = time.perf_counter() - start
    _save_member_alpha(cfg, dataset, run, arch, alpha, seconds)
    return {"alpha": alpha, "seconds": seconds}


def compute_priors(cfg: RunConfig, dataset: ImageDataset, run: RunFolder, device) -> dict:
    """Run Algorithm 1 for every member (in parallel processes with `workers` > 1) and write priors.json."""
    from .parallel import map_jobs
    from .train import build_context, worker_config_data, workers_for

    pcfg = cfg.prior
    train_idx, eval_idx, synthesis_cfg, eval_cfg = _prior_settings(cfg, dataset)
    members = list(cfg.committee.members)
    context = {"cfg": cfg, "dataset": dataset, "run": run, "device": device}
    outcomes = map_jobs(_prior_member, members, build_context, (worker_config_data(cfg, run),),
                        workers_for(cfg, device), in_process_context=context, log_file=run.log_path)
    details = dict(zip(members, outcomes))
    priors = {
        "alpha": {arch: d["alpha"] for arch, d in details.items()},
        "ipc": pcfg.ipc, "student": pcfg.student, "student_width": cfg.evaluate.student_width or cfg.committee.width,
        "split_seed": pcfg.split_seed, "train_fraction": pcfg.train_fraction,
        "train_images": len(train_idx), "eval_images": len(eval_idx),
        "synthesis_iterations": synthesis_cfg.iterations, "student_epochs": eval_cfg.epochs,
        "seed": cfg.seed, "fingerprint": prior_fingerprint(cfg, dataset), "members": details,
    }
    atomic_write_json(run.priors_path, priors)
    return priors

"""Command-line interface: argument parsing only; the work happens in the library.

Errors a user can act on (bad config, missing or corrupt file, capability not
granted) are printed as one line naming the key or file, with exit code 2. An
unexpected internal error prints one line and the hint to run with `--debug`
(which shows the traceback), exit code 1. No traceback reaches a user who did
not ask for one.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from giaudit.calibrate import calibrate
from giaudit.compare import run_compare
from giaudit.config import AuditSpec, load_config
from giaudit.demo import run_demo
from giaudit.engine import ENGINES, Engine, Interrupted, make_engine
from giaudit.errors import ConfigError, GiauditError, ParamError
from giaudit.io import check_output_dir
from giaudit.metrics.attributes import train_attribute_classifier
from giaudit.orchestration.run import run_and_render
from giaudit.policy import check, load_policy
from giaudit.priors.ddpm import train_main as train_ddpm_main
from giaudit.priors.train import LOSSES
from giaudit.priors.train import train_main as train_gan_main
from giaudit.report import render
from giaudit.results import ResultsStore, load_results


def _audit(args: argparse.Namespace) -> int:
    spec = load_config(args.config)
    return _run_and_report(spec, args.out, not args.no_progress, _engine(args))


def _demo(args: argparse.Namespace) -> int:
    res = run_demo(args.out, faces=args.faces, show_progress=not args.no_progress, engine=_engine(args),
                   active=args.active)
    if res["html"] is None:
        return 0
    store = res["store"]
    _summary(store)
    print(f"report: {res['html']}\nmarkdown: {res['md']}\nresults: {store.run_dir / 'results.json'}")
    print(f"policy verdict (giaudit/assets/policy.toml = examples/policy.toml): "
          f"{'PASS' if res['passed'] else 'FAIL'}\nwall time: {res['wall_s']:.0f} s")
    return 0


def _attribute_train(args: argparse.Namespace) -> int:
    if args.size < 4:  # checked before any image is read (0 failed inside the resize)
        raise ConfigError(f"--size: must be >= 4, got {args.size}")
    check_output_dir(args.out, "--out")
    cfg = train_attribute_classifier(args.data, args.label, args.out, size=args.size, channels=args.channels,
                                     epochs=args.epochs, width=args.width, pool_every=args.pool_every,
                                     seed=args.seed, limit=args.limit,
                                     log=print if not args.quiet else None)
    print(f"{args.label} classifier: held-out accuracy {cfg['heldout_accuracy']:.3f} on {cfg['n_heldout']} images "
          f"(majority class {cfg['majority_accuracy']:.3f}, {cfg['num_classes']} classes); "
          f"saved to {args.out} ({cfg['train_s']:.0f} s)")
    return 0


def _engine(args: argparse.Namespace) -> Engine:
    try:
        return make_engine(args.engine, address=args.address, workers=args.workers)
    except ParamError as exc:  # the library names its parameter; here it is the flag of the same name
        raise ConfigError(f"--{exc.field}: {exc.message}") from None


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="where cells run: local (one single-threaded process per core, default) or ray")
    p.add_argument("--address", help="ray: join this cluster (auto | HOST:PORT); default: start a local instance")
    p.add_argument("--workers", type=int, help="local: processes (default: one per core); ray: CPUs of the "
                   "local instance")


def _run_and_report(spec: AuditSpec, out: str | None, progress: bool, engine: Engine) -> int:
    out_dir = Path(out) if out else spec.run_dir
    run = run_and_render(spec, out_dir, show_progress=progress, engine=engine)
    _summary(run.store)
    print(f"report: {run.html}\nmarkdown: {run.md}\nresults: {out_dir / 'results.json'}")
    if run.verdict is not None:
        print(f"policy verdict: {'PASS' if run.verdict.passed else 'FAIL'}")
        for line in run.verdict.flip_lines():  # a false PASS an untuned audit would have given
            print(line)
    return 0


def _summary(store: ResultsStore) -> None:
    for r in store.records:
        m = r.metrics
        if "psnr_db_mean" not in m:  # no ground truth (a server-side capture): nothing was measured
            print(f"{r.attack:>6} seed {r.seed}: reconstructed; no ground truth to measure against (see the "
                  f"report's images)  {r.timings.get('attack_s', 0):.1f}s")
            continue
        print(f"{r.attack:>6} seed {r.seed}: PSNR mean {m.get('psnr_db_mean', float('nan')):6.2f} dB "
              f"worst {m.get('psnr_db_worst', float('nan')):6.2f} dB  SSIM {m.get('ssim_mean', float('nan')):.3f}  "
              f"labels {m.get('label_accuracy', float('nan')):.2f} ({r.label_source})  "
              f"{r.timings.get('attack_s', 0):.1f}s")


def _report(args: argparse.Namespace) -> int:
    store = load_results(args.results)
    check_output_dir(store.run_dir, "run folder")  # the report is written beside the results
    verdict = None
    if args.policy:
        verdict = check(store.records, load_policy(args.policy), store.meta)
    html, md = render(store, store.run_dir, verdict=verdict)
    print(f"report: {html}\nmarkdown: {md}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    attacks = [a.strip() for a in args.attacks.split(",")] if args.attacks else None
    try:
        out = run_compare([Path(p) for p in args.defenses], base_config=Path(args.config) if args.config else None,
                          attacks=attacks, seeds=args.seeds, out_dir=Path(args.out),
                          show_progress=not args.no_progress, clients_per_seed=args.clients_per_seed,
                          engine=_engine(args), policy=Path(args.policy) if args.policy else None)
    except ParamError as exc:  # run_compare names its parameter; here it is the flag of the same name
        if exc.field not in ("attacks", "seeds", "clients_per_seed"):
            raise
        raise ConfigError(f"--{exc.field.replace('_', '-')}: {exc.message}") from None
    print(f"comparison report: {out}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    """Exit 0 with the chosen setting written as a preset, 1 when no setting in the bracket passes."""
    res = calibrate(args.defense, args.param, args.policy, config=args.config, out=args.out, low=args.low,
                    high=args.high, steps=args.steps, utility_rounds=args.utility_rounds, engine=_engine(args),
                    log=print)
    print(f"frontier: {Path(args.out) / 'calibrate.png'}\nevaluations: {Path(args.out) / 'calibrate.json'}")
    return 0 if res["chosen"] is not None else 1


def _check(args: argparse.Namespace) -> int:
    """Print each rule and PASS/FAIL; exit 0 when every rule passes, 1 when one fails (2: bad input, via main)."""
    policy = load_policy(args.policy)
    store = load_results(args.results)
    verdict = check(store.records, policy, store.meta)
    print(f"policy {policy.source} on {args.results} ({len(store.records)} records)")
    if store.duplicates:
        repeated = ", ".join(sorted(set(store.duplicates)))
        print(f"note: {len(store.duplicates)} repeated record(s) counted once: {repeated}")
    print(verdict.format())
    return 0 if verdict.passed else 1


def _prior_train(a: argparse.Namespace) -> int:
    # Checked before any data is read: 0 steps must not mean "the default", nor a negative budget "untrained".
    if a.steps is not None and a.steps < 1:
        raise ConfigError("--steps: must be >= 1 (omit it for the default)")
    for flag, value in (("--minutes", a.minutes), ("--checkpoint-minutes", a.checkpoint_minutes)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag}: must be > 0, got {value:g}")
    if a.out.suffix == ".safetensors":
        check_output_dir(a.out.parent, "--out")
    elif a.out.exists() and not a.out.is_dir():
        raise ConfigError(f"--out {a.out}: an existing file; pass a folder or NAME.safetensors")
    else:
        check_output_dir(a.out, "--out")
    if a.kind == "ddpm":
        path = train_ddpm_main(a.data, a.out, steps=a.steps or 100_000, minutes=a.minutes, size=a.size, seed=a.seed,
                               batch_size=a.batch_size, lr=a.lr, holdout_mod=a.holdout_mod, limit=a.limit,
                               threads=a.threads, width=a.width or 32, checkpoint_minutes=a.checkpoint_minutes,
                               show_progress=not a.no_progress, resume=a.resume)
    else:
        path = train_gan_main(a.data, a.out, steps=a.steps or 2000, size=a.size, seed=a.seed, latent_dim=a.latent_dim,
                              width=a.width or 16, loss=a.loss, holdout_mod=a.holdout_mod, limit=a.limit,
                              threads=a.threads, sample_every=a.sample_every, show_progress=not a.no_progress)
    print(f"prior: {path}")
    return 0


def _add_prior_train_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of `giaudit prior train` (GAN, and with --kind ddpm the DDPM)."""
    ap.add_argument("--kind", choices=("gan", "ddpm"), default="gan", help="gan (DCGAN generator, default) or "
                    "ddpm (diffusers UNet2DModel noise predictor)")
    ap.add_argument("--data", required=True, help="mnist5k | digits | lfw_subset | an image folder")
    ap.add_argument("--out", required=True, type=Path, help="a folder, or NAME.safetensors")
    ap.add_argument("--steps", type=int, default=None, help="generator steps (default 2000; ddpm: 100000, "
                    "normally stopped by --minutes)")
    ap.add_argument("--size", type=int, default=32, help="image size in pixels, 28..64 (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latent-dim", type=int, default=32)
    ap.add_argument("--width", type=int, default=None, help="generator width (default 16; ddpm: UNet base "
                    "channels, default 32)")
    ap.add_argument("--loss", choices=LOSSES, default="gan", help="gan (spectral-norm critic) or wgan-gp")
    ap.add_argument("--holdout-mod", type=int, default=5,
                    help="leave out images whose index is a multiple of this (the audit's client pool; 0 keeps all)")
    ap.add_argument("--limit", type=int, default=None, help="read at most this many images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sample-every", type=int, default=0,
                    help="write a sample grid every N steps (0: only at the end)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ap.add_argument("--minutes", type=float, default=None,
                    help="ddpm: wall-time budget in minutes (training stops at --steps or here, whichever first)")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0,
                    help="ddpm: write an atomic checkpoint this often (default 5)")
    ap.add_argument("--batch-size", type=int, default=64, help="ddpm: batch size (default 64)")
    ap.add_argument("--lr", type=float, default=5e-4, help="ddpm: AdamW learning rate (default 5e-4)")
    ap.add_argument("--resume", default=None, help="ddpm: continue training this prior (name or path) for "
                    "--steps more steps; its architecture is kept")


def _doctor(args: argparse.Namespace) -> int:
    from giaudit.doctor import doctor_main, needs

    if not args.config:
        return doctor_main(as_json=args.json)
    spec = load_config(args.config)
    # The priors the config's attacks load: their own option, else the attack's default.
    priors = [p for attack in spec.attacks.values() if isinstance(p := attack.option("prior"), str)]
    return doctor_main(needed=needs(spec.output, priors), priors=priors, config=args.config, as_json=args.json)


def _weights_fetch(args: argparse.Namespace) -> int:
    from giaudit.weights import fetch_main

    if args.dest is not None:
        check_output_dir(args.dest, "--dest")
    return fetch_main(args.names, source=args.source, dest=args.dest, engine=args.engine, sha256=args.sha256,
                      allow_unpinned=args.allow_unpinned)


def _weights_list(args: argparse.Namespace) -> int:
    from giaudit.weights import list_main

    return list_main(engine=args.engine)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="giaudit", description="Audit what a curious federated-learning server can "
                                "reconstruct from shared updates, under defenses.")
    p.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("audit", help="run an audit from a TOML config", description="Run every attack of CONFIG on "
                       "the configured scenario and defenses; write results and an HTML/Markdown report.")
    a.add_argument("config", help="audit config (TOML); see examples/")
    a.add_argument("--out", help="run folder (default: output.dir of the config, else reports/<name>)")
    a.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_engine_arguments(a)
    a.set_defaults(func=_audit)

    d = sub.add_parser("demo", help="three defenses x IG and GIAS on digits, one report with the verdict "
                       "(under 3 minutes on 2 CPU cores)",
                       description="Run the embedded demo (giaudit/assets/demo.toml) under the defenses none, noise "
                       "and DP-SGD, measure utility and digit leakage, judge with examples/policy.toml, and write "
                       "reports/demo/report.html.")
    d.add_argument("--out", help="run folder (default: reports/demo, or reports/demo-faces)")
    d.add_argument("--faces", action="store_true", help="faces from scikit-image's lfw_subset with the offline face "
                   "backend (pip install \"giaudit[faces]\")")
    d.add_argument("--active", action="store_true", help="add a malicious server's row: Robbing the Fed's imprint "
                   "through secure aggregation of 8 clients (SoK class G)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_engine_arguments(d)
    d.set_defaults(func=_demo)

    r = sub.add_parser("report", help="re-render the report of a finished run",
                       description="Render report.html and report.md from saved results (no attack is re-run).")
    r.add_argument("results", help="run folder or its results.json")
    r.add_argument("--policy", help="policy TOML; show its verdict in the report")
    r.set_defaults(func=_report)

    c = sub.add_parser("compare", help="compare defense configurations on leakage and utility",
                       description="Run the same scenario and attacks under each defense preset; write a comparison "
                       "report.")
    c.add_argument("defenses", nargs="+", help="defense preset files (TOML), e.g. defenses/*.toml")
    c.add_argument("--config", help="base audit config (default: the embedded demo)")
    c.add_argument("--attacks", help="comma-separated attack names (default: those of the config)")
    c.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    c.add_argument("--clients-per-seed", type=int, default=8, help="private batches attacked per seed, the same "
                   "under every preset (default 8; scenario.clients_per_seed in the config wins)")
    c.add_argument("--out", default="reports/compare", help="output folder (default reports/compare)")
    c.add_argument("--policy", help="policy TOML to judge every preset by (default: the config's output.policy); "
                   "a tuned attack is judged at its defaults too, and a rule it passed untuned but fails tuned "
                   "is stated as such")
    c.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_engine_arguments(c)
    c.set_defaults(func=_compare)

    k = sub.add_parser("check", help="check saved results against a policy (exit 0 pass, 1 fail, 2 bad input)",
                       description="Print each policy rule with its measured value and PASS/FAIL.")
    k.add_argument("results", help="run folder or its results.json")
    k.add_argument("--policy", required=True, help="policy TOML (see examples/policy.toml)")
    k.set_defaults(func=_check)

    cb = sub.add_parser("calibrate", help="the weakest setting of one defense parameter that passes a policy "
                        "(exit 0 found, 1 none, 2 bad input)",
                        description="Bisect one monotone parameter of a defense preset (dpsgd noise_multiplier or "
                        "epsilon, noise sigma, sparsify sparsity): DP bounds first, then attacks (and utility) at "
                        "the candidates; write the frontier plot and the chosen setting as a preset.")
    cb.add_argument("defense", help="defense preset (TOML), e.g. defenses/dpsgd-eps8.toml")
    cb.add_argument("--param", required=True, help="the parameter to bisect, e.g. noise_multiplier")
    cb.add_argument("--policy", required=True, help="policy TOML the setting must pass")
    cb.add_argument("--config", help="base audit config (default: the embedded demo)")
    cb.add_argument("--low", type=float, help="bracket's low end (default per parameter)")
    cb.add_argument("--high", type=float, help="bracket's high end (default per parameter)")
    cb.add_argument("--steps", type=int, default=4, help="bisection steps after both ends (default 4)")
    cb.add_argument("--utility-rounds", type=int, default=0, help="federated training rounds to measure each "
                    "candidate's utility (default 0: skip)")
    cb.add_argument("--out", default="reports/calibrate", help="output folder (default reports/calibrate)")
    _add_engine_arguments(cb)
    cb.set_defaults(func=_calibrate)

    at = sub.add_parser("attribute", help="attribute classifiers for semantic leakage",
                        description="Train classifiers that read an attribute off reconstructions.")
    asub = at.add_subparsers(dest="attribute_command", required=True, metavar="ATTRIBUTE_COMMAND")
    atr = asub.add_parser("train", help="train a small attribute classifier on data outside the audited pool",
                          description="Train a small CNN for one label on the images outside the audited client "
                          "pool (index %% POOL_EVERY != 0); save DIR/classifier.safetensors and DIR/classifier.json "
                          "with its held-out accuracy. Use it with output.attributes = { NAME = \"DIR\" }.")
    atr.add_argument("--data", required=True, help="an image folder (UTKFace-style names or one subfolder per "
                     "class) or a built-in source: mnist5k, digits, lfw_subset")
    atr.add_argument("--label", required=True, help="gender | race | age for UTKFace names; label for subfolders "
                     "and built-in sources")
    atr.add_argument("--out", required=True, help="output folder")
    atr.add_argument("--size", type=int, default=32, help="image size the classifier sees (default 32)")
    atr.add_argument("--channels", type=int, choices=(1, 3), help="convert images to 1 or 3 channels")
    atr.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    atr.add_argument("--width", type=int, default=32, help="channels of the first conv block (default 32)")
    atr.add_argument("--pool-every", type=int, default=5, help="the audited pool is index %% N == 0 (default 5, "
                     "as data.pool_every); those images are never trained on")
    atr.add_argument("--limit", type=int, help="read at most this many images of a folder")
    atr.add_argument("--seed", type=int, default=0)
    atr.add_argument("--quiet", action="store_true", help="no per-epoch log")
    atr.set_defaults(func=_attribute_train)

    pr = sub.add_parser("prior", help="generative priors", description="Train and inspect generative priors.")
    psub = pr.add_subparsers(dest="prior_command", required=True, metavar="PRIOR_COMMAND")
    pt = psub.add_parser("train", help="train a GAN or DDPM prior on CPU",
                         description="Train a DCGAN (or, with --kind ddpm, a DDPM) prior and save it as "
                         "safetensors + JSON config.")
    _add_prior_train_arguments(pt)
    pt.set_defaults(func=_prior_train)

    dr = sub.add_parser("doctor", help="which optional capabilities are ready here, and how to enable each",
                        description="Print one row per optional capability (LPIPS, face backends, deepface models, "
                        "priors, Ray, Flower, Chromium): status, where giaudit looks, the command that enables it. "
                        "With --config: exit 0 when everything the config needs is ready, else 1.")
    dr.add_argument("--config", help="audit config (TOML) whose needs decide the exit code")
    dr.add_argument("--json", action="store_true", help="print the table as JSON")
    dr.set_defaults(func=_doctor)

    w = sub.add_parser("weights", help="fetch published model weights (the only command that downloads)",
                       description="Fetch model weights into the folders giaudit's loaders read. Audits and "
                       "reports never download.")
    wsub = w.add_subparsers(dest="weights_command", required=True, metavar="WEIGHTS_COMMAND")
    wf = wsub.add_parser("fetch", help="download (or copy) weights, verify their SHA-256, write them atomically",
                         description="Download NAME... (or all) into $TORCH_HOME/hub/checkpoints or "
                         "$DEEPFACE_HOME/.deepface/weights, verify the pinned SHA-256, resume interrupted "
                         "transfers (HTTP Range).")
    wf.add_argument("names", nargs="+", metavar="NAME", help="lpips-alexnet, deepface-age, deepface-gender, "
                    "deepface-race, deepface-vggface, deepface-facenet, or all")
    wf.add_argument("--from", dest="source", metavar="DIR_OR_URL",
                    help="a local folder holding the files (no network) or a mirror base URL (URL/<file>)")
    wf.add_argument("--dest", help="write every file into this folder instead of the loaders' folders "
                    "(e.g. to carry them to an air-gapped machine)")
    wf.add_argument("--engine", help="deepface engine the files are for: tensorflow, pytorch or onnx "
                    "(default: the one deepface runs on)")
    wf.add_argument("--sha256", metavar="HEX", help="expected SHA-256 (one NAME only; e.g. a private mirror's file)")
    wf.add_argument("--allow-unpinned", action="store_true",
                    help="fetch files that have no published SHA-256 (the hash is printed, not checked)")
    wf.set_defaults(func=_weights_fetch)
    wl = wsub.add_parser("list", help="the weight names, files, destinations and hash sources",
                         description="List every weight name with its file, pinned hash and destination.")
    wl.add_argument("--engine", help="deepface engine: tensorflow, pytorch or onnx")
    wl.set_defaults(func=_weights_list)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GiauditError as exc:
        print(f"giaudit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Interrupted as stop:  # SIGINT / SIGTERM during a sweep: the finished cells are written
        saved = (f"{stop.saved} finished record(s) are saved in {stop.folder}" if stop.folder is not None
                 else "the finished results are saved")
        command = shlex.join(["giaudit", *(sys.argv[1:] if argv is None else argv)])
        print(f"giaudit: stopped by {stop}: {saved}; resume with: {command}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("giaudit: interrupted; finished records are saved, run the same command again to resume",
              file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line, the traceback only on request
        if args.debug:
            raise
        print(f"giaudit: internal error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Run heretic (heretic-llm 1.4.0) non-interactively on local prompts and a local model.

heretic's own entry point (``heretic.main.run``) is interactive (trial menu, save
menu) and imports ``lm_eval`` for its benchmark menu.  This script drives heretic's
modules directly instead -- ``heretic.config.Settings``, ``heretic.model.Model``,
``heretic.evaluator.Evaluator``, ``heretic.utils.load_prompts`` -- and replays the
body of ``heretic.main.run`` (batch-size search, common-response-prefix check,
refusal directions, the Optuna study with heretic's objective and sampler, the
Pareto front) without any prompt.  The trial chosen from heretic's Pareto front
is then restored the way heretic restores a trial, scored on the test prompts
with heretic's own ``Evaluator`` (refusal markers; first-token KL) and
optionally merged and saved.

See README.md beside this file for the install line and the metric definitions.

Output JSON keys: heretic_version, heretic_trials, heretic_wall_s,
heretic_refusals, heretic_kl, chosen_trial (parameters), and more detail.
"""

import time

T0 = time.perf_counter()  # whole-run clock: start-up (imports, model load) included

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.machinery  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import types  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Run heretic's abliteration optimisation non-interactively "
        "and report its best trial's refusals and KL.",
    )
    p.add_argument("--model", help="local Hugging Face model folder (bf16)")
    p.add_argument("--harmful-train", help="JSON list of {'instruction': ...} (bad_prompts)")
    p.add_argument("--harmless-train", help="JSON list (good_prompts)")
    p.add_argument("--harmful-test", help="JSON list; refusals are counted on these")
    p.add_argument("--harmless-test", help="JSON list; first-token KL is measured on these")
    p.add_argument(
        "--harmful-val",
        help="optional JSON list: if given (with --harmless-val), heretic's optimisation "
        "objective uses the val sets and only the chosen trial is scored on the test sets. "
        "If not given, heretic's native setup is used: the objective IS the test sets.",
    )
    p.add_argument("--harmless-val", help="optional JSON list, see --harmful-val")
    p.add_argument("--key", default="instruction", help="prompt field in the JSON records")
    p.add_argument(
        "--n-train",
        type=int,
        default=400,
        help="use the first N prompts of each train list (heretic's default is 400 = train[:400])",
    )
    p.add_argument("--n-harmful-test", type=int, default=100, help="first N harmful test prompts")
    p.add_argument("--n-harmless-test", type=int, default=100, help="first N harmless test prompts")
    p.add_argument("--n-val", type=int, default=100, help="first N prompts of each val list")
    p.add_argument("--trials", type=int, help="number of Optuna trials (heretic n_trials; default there 200)")
    p.add_argument(
        "--startup-trials",
        type=int,
        default=None,
        help="random-sampling trials before TPE (heretic n_startup_trials). "
        "Default: round(0.3 * trials), heretic's own 60/200 ratio.",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds of whole-run wall time: no new trial is started if it would "
        "(at the mean trial time so far) end after this. For the device's 600 s cap.",
    )
    p.add_argument("--seed", type=int, default=0, help="heretic seed (heretic's default is random)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="0 = heretic's automatic search (doubling 1..--max-batch-size, pick fastest)",
    )
    p.add_argument("--max-batch-size", type=int, default=128, help="cap of the automatic batch-size search")
    p.add_argument(
        "--system-prompt", default=None, help="heretic system_prompt (default 'You are a helpful assistant.')"
    )
    p.add_argument(
        "--max-response-length", type=int, default=None, help="heretic max_response_length (default 100 tokens)"
    )
    p.add_argument(
        "--max-kl",
        type=float,
        default=0.5,
        help="choice rule: among heretic's Pareto-optimal trials, the one with fewest "
        "refusals whose KL <= this (ties: lower KL). heretic's menu warns that KL > 0.5 "
        "'usually indicates significant damage'. If none qualifies, the lowest-KL one.",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="any other heretic Settings field, value parsed as JSON if possible, "
        "e.g. --set row_normalization='\"none\"' --set kl_divergence_target=0.01",
    )
    p.add_argument(
        "--loader",
        choices=["auto", "heretic", "direct"],
        default="auto",
        help="'heretic': prompts go through heretic's load_prompts from local datasets "
        "folders (jsonl) written to a temp dir; 'direct': build heretic's Prompt objects "
        "from the JSON; 'auto': heretic, falling back to direct if the datasets package fails.",
    )
    p.add_argument(
        "--reeval", action="store_true", help="re-score the chosen trial on the test sets even in native mode"
    )
    p.add_argument("--save", help="merge the chosen trial's LoRA and save the full model here")
    p.add_argument("--out", help="output JSON file")
    p.add_argument("--workdir", help="where to write the converted prompt datasets (default: a temp dir)")
    p.add_argument(
        "--check", action="store_true", help="only import heretic and its dependencies, print versions, exit"
    )
    args = p.parse_args(argv)
    if not args.check:
        missing = [
            f"--{n.replace('_', '-')}"
            for n in ("model", "harmful_train", "harmless_train", "harmful_test", "harmless_test", "trials", "out")
            if getattr(args, n) is None
        ]
        if missing:
            p.error("missing: " + " ".join(missing))
        if (args.harmful_val is None) != (args.harmless_val is None):
            p.error("--harmful-val and --harmless-val go together")
    return args


# ----------------------------------------------------------------------------------
# Imports of heretic, with two stand-ins for packages it imports but that are not
# needed here (and not on the GPU machine):
#   * bitsandbytes: heretic.model does `import bitsandbytes as bnb` at module level
#     and uses it only to dequantize 4-bit weights (quantization = bnb_4bit).  A
#     ~60 MB CUDA wheel for nothing; an empty module stands in while heretic.model
#     is imported and is removed from sys.modules right after, so that
#     transformers/peft still see bitsandbytes as absent.
#   * datasets: carried as a real wheel.  If it cannot be imported (e.g. a pyarrow
#     mismatch) a stub with the names heretic.utils imports stands in and prompts
#     are built directly (--loader direct).
# lm_eval (heretic.main's benchmark menu) is never imported: heretic.main isn't.
# ----------------------------------------------------------------------------------

STUBS = []


def _stub(name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _datasets_stub():
    class _Unavailable:
        def __init__(self, *a, **k):
            raise RuntimeError("the datasets package is not available (stub)")

    def _unavailable(*a, **k):
        raise RuntimeError("the datasets package is not available (stub)")

    for name in [n for n in sys.modules if n == "datasets" or n.startswith("datasets.")]:
        del sys.modules[name]
    root = _stub(
        "datasets",
        DatasetDict=_Unavailable,
        ReadInstruction=_Unavailable,
        load_dataset=_unavailable,
        load_from_disk=_unavailable,
    )
    root.config = _stub("datasets.config", DATASET_STATE_JSON_FILENAME="state.json")
    root.download = _stub("datasets.download")
    root.download.download_manager = _stub("datasets.download.download_manager", DownloadMode=_Unavailable)
    root.utils = _stub("datasets.utils")
    root.utils.info_utils = _stub("datasets.utils.info_utils", VerificationMode=_Unavailable)
    STUBS.append("datasets")


def import_heretic():
    # Nothing can be fetched on the GPU machine; never wait on the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # heretic.main.run sets this before loading anything.
    if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"

    import peft  # noqa: F401  (before any stub: peft caches is_bnb_available)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    try:
        import datasets  # noqa: F401
    except Exception as error:  # pragma: no cover - depends on the machine
        print(f"[run_heretic] datasets unavailable ({error!r}); using a stub", file=sys.stderr)
        _datasets_stub()

    bnb_stubbed = False
    try:
        importlib.import_module("bitsandbytes")
    except Exception:
        sys.modules.pop("bitsandbytes", None)
        _stub("bitsandbytes")
        bnb_stubbed = True
    try:
        import heretic.model  # noqa: F401
    finally:
        if bnb_stubbed:
            del sys.modules["bitsandbytes"]
            STUBS.append("bitsandbytes")
    import heretic.config
    import heretic.evaluator
    import heretic.system
    import heretic.utils

    return heretic


def versions():
    out = {}
    for name in [
        "heretic-llm",
        "torch",
        "transformers",
        "accelerate",
        "peft",
        "optuna",
        "pydantic",
        "pydantic-settings",
        "datasets",
        "pyarrow",
        "fsspec",
        "numpy",
        "rich",
        "questionary",
        "typing-extensions",
        "huggingface-hub",
        "gguf",
        "bitsandbytes",
    ]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_prompts(path, key, n):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    prompts = [(r[key] if isinstance(r, dict) else r) for r in data]
    if n is not None:
        prompts = prompts[:n]
    if not prompts:
        raise SystemExit(f"no prompts in {path}")
    return prompts


def main(argv=None):
    args = parse_args(argv)

    if args.check:
        import_heretic()
        print(json.dumps({"versions": versions(), "stubs": STUBS}, indent=2))
        return 0

    workdir = args.workdir or tempfile.mkdtemp(prefix="heretic_run_")
    os.makedirs(workdir, exist_ok=True)
    # datasets caches what load_dataset builds; keep that out of $HOME.
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(workdir, "hf_datasets_cache"))

    heretic = import_heretic()

    import logging
    import warnings
    from dataclasses import asdict
    from os.path import commonprefix

    import optuna
    import torch
    import torch.nn.functional as F
    import transformers
    from heretic.config import DatasetSpecification, Settings
    from heretic.evaluator import Evaluator
    from heretic.model import AbliterationParameters, Model
    from heretic.system import empty_cache
    from heretic.utils import Prompt, format_exception, get_trial_parameters, set_seed
    from heretic.utils import print as hprint
    from optuna.exceptions import ExperimentalWarning
    from optuna.samplers import TPESampler
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    t_imported = time.perf_counter()

    # ---- prompts -------------------------------------------------------------------
    sets = {
        "harmful_train": read_prompts(args.harmful_train, args.key, args.n_train),
        "harmless_train": read_prompts(args.harmless_train, args.key, args.n_train),
        "harmful_test": read_prompts(args.harmful_test, args.key, args.n_harmful_test),
        "harmless_test": read_prompts(args.harmless_test, args.key, args.n_harmless_test),
    }
    val_mode = args.harmful_val is not None
    if val_mode:
        sets["harmful_val"] = read_prompts(args.harmful_val, args.key, args.n_val)
        sets["harmless_val"] = read_prompts(args.harmless_val, args.key, args.n_val)

    # heretic's local-dataset format: a folder that datasets.load_dataset(folder,
    # split="train") reads, here one train.jsonl with a "text" column (heretic's
    # default column name).  Plain .txt (one prompt per line) is heretic's other
    # local format, but it would split the multi-line Alpaca prompts.
    specs, expected = {}, {}
    for name, prompts in sets.items():
        folder = os.path.join(workdir, "prompts", name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "train.jsonl"), "w", encoding="utf-8") as f:
            for text in prompts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        specs[name] = DatasetSpecification(dataset=folder, split="train", column="text")
        expected[folder] = prompts

    loader = args.loader
    if loader in ("auto", "heretic") and "datasets" in STUBS:
        if loader == "heretic":
            raise SystemExit("--loader heretic needs the datasets package")
        loader = "direct"
    heretic_load_prompts = heretic.utils.load_prompts
    loaders_used = set()

    def load_prompts(settings, spec):
        nonlocal loader
        if loader in ("auto", "heretic"):
            try:
                prompts = heretic_load_prompts(settings, spec)
                got = [p.user for p in prompts]
                if got != expected[spec.dataset]:
                    raise RuntimeError(f"heretic's loader changed the prompts of {spec.dataset}")
                loaders_used.add("heretic")
                return prompts
            except Exception as error:
                if loader == "heretic":
                    raise
                hprint(
                    f"[yellow]heretic's load_prompts failed ({format_exception(error)}); building prompts directly[/]"
                )
                loader = "direct"
        # Same as heretic.utils.load_prompts after reading the column.
        loaders_used.add("direct")
        texts = expected[spec.dataset]
        if spec.prefix:
            texts = [f"{spec.prefix} {t}" for t in texts]
        if spec.suffix:
            texts = [f"{t} {spec.suffix}" for t in texts]
        system = settings.system_prompt if spec.system_prompt is None else spec.system_prompt
        return [Prompt(system=system, user=t) for t in texts]

    heretic.evaluator.load_prompts = load_prompts  # Evaluator.__init__ calls it

    # ---- settings ------------------------------------------------------------------
    n_startup = args.startup_trials
    if n_startup is None:
        n_startup = max(1, round(0.3 * args.trials))
    opt_bad = specs["harmful_val" if val_mode else "harmful_test"]
    opt_good = specs["harmless_val" if val_mode else "harmless_test"]
    kwargs = dict(
        model=args.model,
        n_trials=args.trials,
        n_startup_trials=n_startup,
        seed=args.seed,
        batch_size=args.batch_size,
        max_batch_size=args.max_batch_size,
        good_prompts=specs["harmless_train"],
        bad_prompts=specs["harmful_train"],
        good_evaluation_prompts=opt_good,
        bad_evaluation_prompts=opt_bad,
        export_strategy="merge",
    )
    if args.system_prompt is not None:
        kwargs["system_prompt"] = args.system_prompt
    if args.max_response_length is not None:
        kwargs["max_response_length"] = args.max_response_length
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value

    # Settings() also parses sys.argv (pydantic-settings CLI source) and reads
    # ./config.toml and HERETIC_* variables; the init arguments above take priority
    # over all of those.  Hide our own argv from it and read no config.toml.
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    try:
        sys.argv = [saved_argv[0]]
        os.chdir(workdir)
        settings = Settings(**kwargs)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)

    # ---- what heretic.main.run does before the study --------------------------------
    set_seed(settings.seed)
    hprint(heretic.system.get_accelerator_info())
    torch.set_grad_enabled(False)
    torch._dynamo.config.cache_size_limit = 64
    transformers.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=ExperimentalWarning)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    model = Model(settings)
    t_loaded = time.perf_counter()

    good_prompts = load_prompts(settings, settings.good_prompts)
    bad_prompts = load_prompts(settings, settings.bad_prompts)
    hprint(f"* {len(good_prompts)} good (harmless) / {len(bad_prompts)} bad (harmful) train prompts")

    if settings.batch_size == 0:  # verbatim logic of heretic.main.run
        hprint("Determining optimal batch size...")
        batch_size, best_batch_size, best_performance = 1, -1, -1
        while batch_size <= settings.max_batch_size:
            hprint(f"* Trying batch size [bold]{batch_size}[/]... ", end="")
            prompts = good_prompts * math.ceil(batch_size / len(good_prompts))
            prompts = prompts[:batch_size]
            try:
                model.get_responses(prompts)
                start_time = time.perf_counter()
                responses = model.get_responses(prompts)
                end_time = time.perf_counter()
            except Exception as error:
                if batch_size == 1:
                    raise
                hprint(f"[red]Failed ({format_exception(error)})[/]")
                break
            response_lengths = [len(model.tokenizer.encode(r)) for r in responses]
            performance = sum(response_lengths) / (end_time - start_time)
            hprint(f"[green]Ok[/] ([bold]{performance:.0f}[/] tokens/s)")
            if performance > best_performance:
                best_batch_size, best_performance = batch_size, performance
            batch_size *= 2
        settings.batch_size = best_batch_size
        hprint(f"* Chosen batch size: [bold]{settings.batch_size}[/]")
    t_batch = time.perf_counter()

    if settings.response_prefix is None:  # verbatim logic of heretic.main.run
        hprint("Checking for common response prefix...")
        prefix_check_prompts = good_prompts[:100] + bad_prompts[:100]
        responses = model.get_responses_batched(prefix_check_prompts)
        settings.response_prefix = commonprefix(responses).rstrip(" ")
        if settings.response_prefix:
            hprint(f"* Prefix found: [bold]{settings.response_prefix!r}[/]")
            for cot_initializer, closed_cot_block in settings.chain_of_thought_skips:
                if settings.response_prefix.startswith(cot_initializer):
                    settings.response_prefix = closed_cot_block
                    responses = model.get_responses_batched(prefix_check_prompts)
                    additional_prefix = commonprefix(responses).rstrip(" ")
                    if additional_prefix:
                        settings.response_prefix += additional_prefix
                    hprint(f"* Using prefix: [bold]{settings.response_prefix!r}[/]")
                    break
        else:
            hprint("* None found")

    # The objective's evaluator (heretic's): base first-token logprobs and base
    # refusals are taken now, on the unmodified model (LoRA B = 0).
    evaluator = Evaluator(settings, model)
    test_evaluator = None
    if val_mode:
        test_settings = settings.model_copy(
            update={"good_evaluation_prompts": specs["harmless_test"], "bad_evaluation_prompts": specs["harmful_test"]}
        )
        test_evaluator = Evaluator(test_settings, model)

    hprint("Calculating per-layer refusal directions...")
    good_means = model.get_residuals_mean(good_prompts)
    bad_means = model.get_residuals_mean(bad_prompts)
    refusal_directions = F.normalize(bad_means - good_means, p=2, dim=1)
    if settings.orthogonalize_direction:
        good_directions = F.normalize(good_means, p=2, dim=1)
        projection_vector = torch.sum(refusal_directions * good_directions, dim=1)
        refusal_directions = refusal_directions - projection_vector.unsqueeze(1) * good_directions
        refusal_directions = F.normalize(refusal_directions, p=2, dim=1)
        del good_directions, projection_vector
    del good_means, bad_means
    empty_cache()
    t_directions = time.perf_counter()

    # ---- the study: heretic's objective, sampler and directions ----------------------
    trial_index = 0
    trial_times = []

    def objective(trial):
        nonlocal trial_index
        trial_start = time.perf_counter()
        trial_index += 1
        trial.set_user_attr("index", trial_index)
        direction_scope = trial.suggest_categorical("direction_scope", ["global", "per layer"])
        last_layer_index = len(model.get_layers()) - 1
        direction_index = trial.suggest_float("direction_index", 0.4 * last_layer_index, 0.9 * last_layer_index)
        if direction_scope == "per layer":
            direction_index = None
        parameters = {}
        for component in model.get_abliterable_components():
            max_weight = trial.suggest_float(f"{component}.max_weight", 0.8, 1.5)
            max_weight_position = trial.suggest_float(
                f"{component}.max_weight_position", 0.6 * last_layer_index, 1.0 * last_layer_index
            )
            min_weight = trial.suggest_float(f"{component}.min_weight", 0.0, 1.0)
            min_weight_distance = trial.suggest_float(f"{component}.min_weight_distance", 1.0, 0.6 * last_layer_index)
            parameters[component] = AbliterationParameters(
                max_weight=max_weight,
                max_weight_position=max_weight_position,
                min_weight=(min_weight * max_weight),
                min_weight_distance=min_weight_distance,
            )
        trial.set_user_attr("direction_index", direction_index)
        trial.set_user_attr("parameters", {k: asdict(v) for k, v in parameters.items()})
        hprint(f"Running trial [bold]{trial_index}[/] of [bold]{settings.n_trials}[/]...")
        for name, value in get_trial_parameters(trial).items():
            hprint(f"  * {name} = [bold]{value}[/]")
        model.reset_model()
        model.abliterate(refusal_directions, direction_index, parameters)
        score, kl_divergence, refusals = evaluator.get_score()
        trial.set_user_attr("kl_divergence", kl_divergence)
        trial.set_user_attr("refusals", refusals)
        trial.set_user_attr("base_refusals", evaluator.base_refusals)
        trial.set_user_attr("n_bad_prompts", len(evaluator.bad_prompts))
        trial_times.append(time.perf_counter() - trial_start)
        hprint(f"[grey50]Elapsed: {time.perf_counter() - T0:.0f} s (trial {trial_times[-1]:.1f} s)[/]")
        return score

    def budget_callback(study, trial):
        if args.time_budget is None or not trial_times:
            return
        mean = sum(trial_times) / len(trial_times)
        # Leave room for restoring + scoring + saving the chosen trial (~1-2 trials' worth).
        reserve = mean * (2 if (val_mode or args.reeval) else 1) + (mean + 60 if args.save else 0)
        if time.perf_counter() - T0 + mean + reserve > args.time_budget:
            hprint(f"[yellow]Time budget: stopping after {len(trial_times)} trials[/]")
            study.stop()

    study = optuna.create_study(
        sampler=TPESampler(
            n_startup_trials=settings.n_startup_trials, n_ei_candidates=128, multivariate=True, seed=settings.seed
        ),
        directions=[StudyDirection.MINIMIZE, StudyDirection.MINIMIZE],
        study_name="heretic",
    )
    study.optimize(objective, n_trials=settings.n_trials, callbacks=[budget_callback])
    t_study = time.perf_counter()

    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not completed:
        raise SystemExit("no trial completed")

    # heretic's Pareto front, exactly as its trial-selection menu builds it.
    sorted_trials = sorted(completed, key=lambda t: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"]))
    min_divergence, pareto = math.inf, []
    for t in sorted_trials:
        if t.user_attrs["kl_divergence"] < min_divergence:
            min_divergence = t.user_attrs["kl_divergence"]
            pareto.append(t)

    # heretic has no default choice (the user picks from the menu).  Ours: fewest
    # refusals among Pareto trials with KL <= --max-kl (pareto is sorted by refusals
    # ascending, KL descending, so the first qualifying one); else the lowest KL.
    qualifying = [t for t in pareto if t.user_attrs["kl_divergence"] <= args.max_kl]
    chosen = qualifying[0] if qualifying else pareto[-1]
    choice_rule = (
        f"fewest refusals among Pareto-optimal trials with KL <= {args.max_kl}"
        if qualifying
        else f"no Pareto trial with KL <= {args.max_kl}: lowest-KL Pareto trial"
    )
    hprint(f"Chosen trial {chosen.user_attrs['index']} ({choice_rule})")

    # Restore the trial the way heretic does (reset_trial_model).
    model.reset_model()
    model.abliterate(
        refusal_directions,
        chosen.user_attrs["direction_index"],
        {k: AbliterationParameters(**v) for k, v in chosen.user_attrs["parameters"].items()},
    )
    if val_mode or args.reeval:
        ev = test_evaluator if val_mode else evaluator
        _, test_kl, test_refusals = ev.get_score()
        base_refusals_test = ev.base_refusals
    else:
        test_kl = chosen.user_attrs["kl_divergence"]
        test_refusals = chosen.user_attrs["refusals"]
        base_refusals_test = evaluator.base_refusals
    t_scored = time.perf_counter()

    saved = merged_kl = merged_refusals = None
    if args.save:
        hprint(f"Saving merged model to {args.save}...")
        merged = model.get_merged_model()
        # heretic scores trials with the LoRA adapter unmerged; the merged bf16
        # weights it exports round W + dW, so they can score slightly differently.
        # Score the exported model too, with the same evaluator.
        peft_model, model.model = model.model, merged
        try:
            _, merged_kl, merged_refusals = (test_evaluator if val_mode else evaluator).get_score()
        finally:
            model.model = peft_model
        merged.save_pretrained(args.save, max_shard_size=settings.max_shard_size)
        model.tokenizer.save_pretrained(args.save)
        if model.processor is not None:
            model.processor.save_pretrained(args.save)
        del merged
        empty_cache()
        saved = os.path.abspath(args.save)
    t_end = time.perf_counter()

    def trial_record(t):
        return {
            "index": t.user_attrs["index"],
            "refusals": t.user_attrs["refusals"],
            "kl": t.user_attrs["kl_divergence"],
            "direction_index": t.user_attrs["direction_index"],
            "abliteration_parameters": t.user_attrs["parameters"],
            "sampled_params": t.params,
        }

    result = {
        "heretic_version": importlib.metadata.version("heretic-llm"),
        "heretic_trials": len(completed),
        "heretic_trials_requested": args.trials,
        "heretic_wall_s": t_end - T0,
        "heretic_refusals": test_refusals,
        "heretic_n_harmful_test": len(sets["harmful_test"]),
        "heretic_kl": test_kl,
        "heretic_n_harmless_test": len(sets["harmless_test"]),
        "heretic_base_refusals": base_refusals_test,
        "objective_sets": "val"
        if val_mode
        else "test (heretic's native setup: the evaluation prompts are the optimisation objective)",
        "choice_rule": choice_rule,
        "chosen_trial": trial_record(chosen),
        "pareto_front": [trial_record(t) for t in pareto],
        "all_trials": [trial_record(t) for t in completed],
        "settings": {
            "model": os.path.abspath(args.model),
            "seed": settings.seed,
            "n_startup_trials": settings.n_startup_trials,
            "batch_size": settings.batch_size,
            "system_prompt": settings.system_prompt,
            "max_response_length": settings.max_response_length,
            "response_prefix": settings.response_prefix,
            "row_normalization": str(settings.row_normalization.value),
            "orthogonalize_direction": settings.orthogonalize_direction,
            "kl_divergence_scale": settings.kl_divergence_scale,
            "kl_divergence_target": settings.kl_divergence_target,
            "n_harmful_train": len(bad_prompts),
            "n_harmless_train": len(good_prompts),
            "dtype": str(model.dtype),
            "extra": {k: kwargs[k] for k in (i.partition("=")[0].strip() for i in args.set)},
        },
        "prompt_loader": sorted(loaders_used),
        "stubs": STUBS,
        "timings_s": {
            "imports": t_imported - T0,
            "model_load": t_loaded - t_imported,
            "batch_size_search": t_batch - t_loaded,
            "prefix_eval_setup_directions": t_directions - t_batch,
            "study": t_study - t_directions,
            "mean_trial": sum(trial_times) / len(trial_times) if trial_times else None,
            "restore_and_score": t_scored - t_study,
            "save": t_end - t_scored,
        },
        "saved_model": saved,
        "saved_model_kl": merged_kl,
        "saved_model_refusals": merged_refusals,
        "versions": versions(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    hprint(
        f"heretic: {test_refusals}/{len(sets['harmful_test'])} refusals, KL {test_kl:.4f} "
        f"(trial {chosen.user_attrs['index']} of {len(completed)}), {result['heretic_wall_s']:.0f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

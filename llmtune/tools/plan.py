"""`llmtune plan`: what a recipe will cost, before any weight is loaded.

Parameter counts and the memory estimate come from memory.py; data is read and tokenized as
`inspect` does; the launch and machine-picked defaults are shown as a run would use them.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..defaults import describe
from ..launch import effective_batch, launch_command, settle
from ..launch.launcher import child_args, write_config
from ..logs import quiet
from ..memory import (
    Settings,
    Shape,
    estimate,
    gib,
    grad_bytes,
    model_shape,
    optimizer_bytes,
    parse_size,
    suggestions,
    teacher_bytes,
)
from ..model import frozen_config
from ..runner.trainer_args import training_args
from ..secret import redact
from .inspect import percentiles, sampled, source_stats


def _checkpointing(args) -> bool:
    return bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))


def launch_lines(resolved, recipe, sets) -> tuple[object, list[str]]:
    """The recipe's launch settled for this machine, and the command lines that run it."""
    import shlex

    launch = settle(resolved.config)
    typed = shlex.join(["llmtune", resolved.method.name, str(recipe), *(a for s in sets for a in ("--set", s))])
    if not launch.needed:
        return launch, [typed]
    write_config(resolved, launch)  # under the llmtune cache, so the printed command runs as it is
    command = launch_command(resolved, launch, child_args(resolved.method.name, str(recipe), sets, launch))
    return launch, [typed, f"which runs: {shlex.join(command)}"]


def plan(resolved, recipe, sets=(), gpu_memory: str | None = None, show_recipe: bool = False) -> list[str]:
    """The lines `llmtune plan` prints: its findings first (what trains, steps, memory, fit, warnings), then each
    section's details, and the resolved recipe when asked; the launch comes from the recipe's `launch:` (after
    `sets`)."""
    import importlib

    import yaml

    budget = parse_size(gpu_memory) if gpu_memory else None
    quiet()
    launch, commands = launch_lines(resolved, recipe, sets)
    processes, backend = launch.world, launch.backend
    config, method = resolved.config, resolved.method
    view, sources, data = source_stats(resolved)
    max_length = config["data"]["max_length"]
    lines = ["\n# data"]
    longest, tokens = 0, 0
    for stats in sources:
        r = stats.report
        p = percentiles(stats.lengths)
        longest = max(longest, p["max"])
        tokens += sum(min(n, max_length or n) for n in stats.lengths) * (r.rows or 0) / max(stats.measured, 1)
        counted = "streamed" if r.rows is None else f"{r.rows} rows"
        lines.append(f"{r.path}: {r.format} ({r.reason}), {counted}; tokens per row{sampled(stats)}: p50 {p['p50']}, "
                     f"p90 {p['p90']}, p99 {p['p99']}, max {p['max']}; {stats.truncated} rows over max_length "
                     f"{max_length}")
    streamed = data.sources[0].rows is None  # no count before the run: train.max_steps sets its length
    rows = None if streamed else len(data.train)
    lines.append(f"training rows after eval hold-out and weights: {'streamed' if streamed else rows}"
                 + (f"; eval rows: {len(data.eval)}" if data.eval is not None else ""))

    shape = model_shape(config, method.head)
    runner = importlib.import_module(method.runner)
    args = training_args(resolved, Path(".llmtune-plan"), runner.defaults(config, data), data)  # creates nothing
    kind = "full fine-tuning" if config.get("adapter") is None else f"{config['adapter']['type']} adapter"
    trained = f"{shape.trainable:,} trainable ({100 * shape.trainable / shape.params:.2f}%, {kind})"
    lines += ["\n# model", f"{config['model']['name']} ({shape.architecture}), weights in {shape.dtype}",
              f"parameters: {shape.params:,} total; {trained}"]
    findings = [f"{method.name} on {config['model']['name']}: {shape.params:,} parameters, {trained}"]

    lines += ["\n# speed (picked for this machine where the recipe leaves it open)",
              *describe(resolved, args, data, shape.attention)]

    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    effective = effective_batch(config, processes)
    packed = bool(getattr(args, "packing", False))
    lines += ["\n# batch",
              f"effective batch: {per_device} per device x {accumulation} accumulation x {processes} process(es) "
              f"= {effective} {'packed sequences' if packed else 'rows'} per optimizer step"]
    if streamed:
        lines.append(f"steps: {args.max_steps} in total (train.max_steps; a stream has no epochs to count)")
        findings.append(f"streamed rows, {effective} per optimizer step: {args.max_steps} steps")
    else:
        sequences = math.ceil(tokens / max_length) if packed and max_length else rows
        batches = math.ceil(sequences / (per_device * processes))
        per_epoch = max(math.ceil(batches / accumulation), 1)
        total = args.max_steps if args.max_steps > 0 else math.ceil(per_epoch * args.num_train_epochs)
        lines.append(f"steps: {per_epoch} per epoch"
                     f"{' (packing: about ' + str(sequences) + ' sequences)' if packed else ''}, {total} in total"
                     + (" (train.max_steps)" if args.max_steps > 0 else f" ({args.num_train_epochs:g} epochs)"))
        findings.append(f"{rows} training rows, {effective} {'packed sequences' if packed else 'rows'} per optimizer "
                        f"step: {total} steps" + (f" ({args.num_train_epochs:g} epochs)" if args.max_steps <= 0
                                                  else ""))

    seq_len = max_length if packed and max_length else min(longest, max_length or longest)
    batch = per_device * (2 if method.paired else 1)
    optim = getattr(args.optim, "value", str(args.optim))
    settings = Settings(batch=batch, seq_len=seq_len, checkpointing=_checkpointing(args), optim=optim,
                        quant=config.get("quantization"), adapter=config.get("adapter"), processes=processes,
                        backend=backend)
    est = estimate(shape, settings)
    if method.reference and config.get("adapter") is None and not getattr(args, "precompute_ref_log_probs",
                                                                                  False):
        est.terms["reference"] = est.terms["weights"]
        est.notes.append("a frozen reference copy of the model (full fine-tuning; an adapter would reuse the base)")
    if method.teacher:
        est.terms["teacher"] = teacher_bytes(model_shape(frozen_config(config, "teacher_model"), method.head),
                                             settings)
    lines.append("\n# memory per GPU (an estimate; docs/plan.md explains each term)")
    explain = {
        "weights": f"{shape.params:,} parameters, {_weights_kind(shape, settings)}",
        "adapter": f"{shape.trainable:,} trainable adapter parameters in float32" if settings.adapter else "none",
        "gradients": f"for the {shape.trainable:,} trainable parameters",
        "optimizer": f"{optim}: {optimizer_bytes(optim, grad_bytes(shape, settings))[1]}",
        "activations": f"{batch} x {seq_len} tokens"
                       + (" (chosen + rejected)" if method.paired else "")
                       + (", gradient checkpointing" if settings.checkpointing else ", no gradient checkpointing"),
        "runtime": "CUDA context, kernels, allocator slack",
        "reference": "frozen reference model",
        "teacher": f"frozen teacher {config.get('teacher_model')}: its weights, and its logits for {batch} x "
                   f"{seq_len} tokens",
    }
    for name, value in est.terms.items():
        lines.append(f"  {name:<12} {gib(value):>12}   {explain[name]}")
    lines.append(f"  {'total':<12} {gib(est.total):>12}")
    verdict = ""
    lines += [f"  note: {note}" for note in est.notes]
    if processes > 1:
        lines.append(f"  {processes} processes with {backend}" + (", sharded" if backend != "ddp" else
                                                                  ": a whole copy on each GPU"))
    if budget is not None:
        if est.total <= budget:
            verdict = f"fits in {gib(budget)} ({gib(budget - est.total)} to spare)"
            lines.append(verdict)
        else:
            verdict = f"does NOT fit in {gib(budget)} (short by {gib(est.total - budget)})"
            lines.append(f"{verdict}; change, in order:")
            for text, after in suggestions(shape, settings, budget):
                mark = "fits" if after <= budget else "still over"
                lines.append(f"  - {text}: {gib(after)} ({mark})")
    findings.append(f"memory per GPU: about {gib(est.total)}" + (f"; {verdict} (see # memory)" if verdict else ""))
    findings += [f"warning: {w}" for w in data.warnings]  # e.g. what the chat template does to the rows
    over = sum(stats.truncated for stats in sources)
    if over:
        findings.append(f"warning: {over} sampled rows are longer than data.max_length {max_length} (their ends do "
                        "not train; see # data)")
    recipe_lines = ["\n# resolved recipe", yaml.safe_dump(redact(config, resolved.recipe.secrets),
                                                          sort_keys=False).rstrip()] if show_recipe else []
    return ["# findings", *findings, *lines, "\n# launch", *commands, *recipe_lines]


def _weights_kind(shape: Shape, s: Settings) -> str:
    if s.quant is None:
        return f"in {shape.dtype}"
    return f"{shape.linear:,} of them in {s.quant['bits']}-bit, the rest in {shape.dtype}"

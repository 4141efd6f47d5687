"""Where generation time goes for the paper run's one-batch, five-condition generate (GPU)."""
import json
import sys
import time

import torch

from refusal import load_model
from refusal.config import default_conditions
from refusal.generation.batched import generate
from refusal.interventions import Plan
from refusal.interventions.specs import condition_interventions
from refusal.runs.folder import RunFolder
from refusal.templates import format_prompts

run = sys.argv[1]
model, tok = load_model("/tmp/m/hf", device="cuda")
splits = json.load(open(f"{run}/splits.json"))
ds = RunFolder(run).directions()
by = {k: format_prompts(tok, [r["instruction"] for r in splits[k]["test"]]) for k in ("harmful", "harmless")}
prompts, rows = [], []
for c in default_conditions():
    ivs = condition_interventions(c, ds)
    prompts += by[c.prompts]
    rows += [ivs] * len(by[c.prompts])
plan = Plan.rows(model, rows)


def timed(label, **kw):
    torch.cuda.synchronize()
    t = time.perf_counter()
    generate(model, tok, prompts, **kw)
    torch.cuda.synchronize()
    print(f"{label}: {time.perf_counter() - t:.2f} s", flush=True)


timed("warmup b512 nplan 8tok", max_new_tokens=8, batch_size=512)
timed("b512 no plan 64 tok", max_new_tokens=64, batch_size=512)
timed("b512 plan 64 tok", max_new_tokens=64, batch_size=512, plan=plan)
timed("b128 plan 64 tok", max_new_tokens=64, batch_size=128, plan=plan)
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    timed("b512 plan 16 tok (profiled)", max_new_tokens=16, batch_size=512, plan=plan)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
timed("b512 plan 64 tok static", max_new_tokens=64, batch_size=512, plan=plan, static_cache=True)
timed("b512 plan 64 tok static again", max_new_tokens=64, batch_size=512, plan=plan, static_cache=True)

"""Ad-hoc probe (not committed): dK/dV edge tiles half vs full height, then the full table."""
import math, os, sys, torch
from l2a_kernels import ops, bench
kern = ops._kernels()
torch.manual_seed(0)
res = []
for (HQ, H, D), cfgs in (((28, 4, 128), [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2)]),
                         ((14, 2, 64), [(64, 64, 4, 3), (64, 64, 4, 2)])):
    T = 131072
    q, k, v = bench._inputs(T, HQ, H, D, grad=False)
    pos = torch.nonzero(bench._route(T, 0.2)).squeeze(1).to(torch.int32)
    docstart, docend = ops._doc_bounds(None, T, q.device)
    scale = 1 / math.sqrt(D)
    do = torch.randn_like(q)
    out, lse = kern.forward(q, k, v, pos, docstart, None, scale)
    best = (float("inf"), None, None)
    for cfg in cfgs:
        for edge in (True, False):
            kern.CONFIGS["dkdv"][D] = cfg
            kern.EDGE_HALF = edge
            t = bench._timer(lambda: kern.backward(do, q, k, v, out, lse, pos, docstart, docend, None, scale), 300)
            res.append(f"| {HQ}/{H}/{D} | {cfg} | {edge} | {t:.2f} |")
            print(res[-1], file=sys.stderr, flush=True)
            if D == 128 and t < best[0]:
                best = (t, cfg, edge)
            if D == 64 and t < best[0]:
                best = (t, cfg, edge)
    kern.CONFIGS["dkdv"][D] = best[1]
    if D == 128:
        kern.EDGE_HALF = best[2]
        edge128 = best[2]
    del q, k, v, do, out, lse
    torch.cuda.empty_cache()
kern.EDGE_HALF = edge128
print("| HQ/H/D | dkdv config | EDGE_HALF | backward ms |\n|---|---|---|---|\n" + "\n".join(res))
print("EDGE_HALF", kern.EDGE_HALF)
bench.main(["--check", "--profile", "--json", os.path.join(os.environ["OUT"], "bench5.json")])

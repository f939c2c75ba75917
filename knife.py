import sys, torch, math, numpy as np
sys.path.insert(0,'/work/main')
import fastrl
def op(x, P):
    B = P.shape[0]
    return torch.ops.fastrl.sample(x.expand(B, -1), torch.tensor([7]), 1.0, 0, 1.0, 0.0, None, None, P, None)
nblk = 200; V = 64*nblk
found = 0
for Lexp in (-31, -33, -35, -38):
  for frac in (1.3, 1.7, 1.9, 1.11, 1.55):
    L = frac * 2.0**Lexp
    xL = float(np.float32(math.log(L))); x2 = float(np.float32(math.log(L*0.9))); xlow = float(np.float32(math.log(L/300)))
    x = torch.full((1, V), -float('inf'))
    x[0,0] = 0.0; x[0,1:64] = xlow
    for M in (8, 5, 13):
      xx = x.clone()
      for b in range(1, 1+M): xx[0, b*64] = xL
      xx[0, (1+M)*64:] = x2
      eL = math.exp(xL); e2 = math.exp(x2); elow = math.exp(xlow)
      z = 1 + 63*elow + M*eL + (nblk-1-M)*64*e2
      p0 = (1 + M*eL)/z
      P = torch.tensor([p0 + k*2**-53 for k in range(-400, 401)], dtype=torch.float64).clamp(max=1.0)
      t, lp, flp = op(xx, P)
      s = xx[0, t].double()
      zk = torch.exp(s - flp.double())   # C++ kept mass
      bad = zk > 1 + M*eL + 3*e2
      if bad.any():
        found += 1
        i = bad.nonzero()[0].item()
        print(f"L={L:.3g} M={M}: {int(bad.sum())}/{len(P)} top_p values keep extra mass; e.g. top_p={P[i].item()!r} z_kept={zk[i].item():.12g} vs expected ~{1+M*eL:.12g}")
print("found", found)

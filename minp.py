import sys, torch, math
sys.path.insert(0,'/tmp/rv'); sys.path.insert(0,'/work/main')
from cmp import op, cmp
B=4000
# 1. min-p threshold rounded to nearest float: m=1000 (ulp 6.1e-5), token at m-0.5, min_p = exp(-0.49998)
x = torch.tensor([[1000.0, 999.5]]).repeat(B,1)
cmp("min_p=exp(-0.49998), m=1000", x, min_p=math.exp(-0.49998))
x = torch.tensor([[30.0, 29.0]]).repeat(B,1)
cmp("min_p=exp(-0.9999999), m=30", x, min_p=math.exp(-0.9999999))
# 2. tiny T below 1/FLT_MAX
x = torch.tensor([[0.0, -1e-38]]).repeat(B,1)
cmp("T=1e-40 logits [0,-1e-38]", x, temperature=1e-40)
# 3. huge T with huge logits (x-m overflow in fp32)
x = torch.tensor([[3e38, -3e38]]).repeat(B,1)
cmp("T=1e39 logits [3e38,-3e38]", x, temperature=1e39)
x = torch.tensor([[3e38, 2e38]]).repeat(B,1)
cmp("T=1e39 logits [3e38, 2e38]", x, temperature=1e39)
cmp("T=1e38 logits [3e38, 2e38]", x, temperature=1e38)

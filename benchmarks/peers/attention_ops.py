r"""ViT-B/16's forward ops one at a time (batch 8, 224 px), through torch or jax, 2 threads.

  benchmarks/peers/.venv/bin/python benchmarks/peers/attention_ops.py torch
  python benchmarks/peers/attention_ops.py jax

The dense matmuls, the attention products (flax's layout [B, T, H, D], jax.nn's, and head-major
[B, H, T, D] einsums; torch's SDPA and plain matmuls), LayerNorm and tanh-GELU: GFLOP/s and ms
(median of 10 after two warm-up calls). Where vadapt.layers.head_major_einsum comes from.
"""
import numpy as np
B, T, D, H, F = 8, 197, 768, 12, 3072
M = B * T
def timeit(fn, flops, repeats=10):
  fn(); fn()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
  return round(flops / statistics.median(ts) / 1e9, 1), round(statistics.median(ts) * 1e3, 2)
rng = np.random.default_rng(0)
r = lambda *s: rng.standard_normal(s, dtype=np.float32)
dense = {'qkv/out 1576x768x768': (M, D, D), 'mlp up 1576x768x3072': (M, D, F), 'mlp down 1576x3072x768': (M, F, D)}
att_flops = 2 * 2 * B * H * T * T * (D // H)
out = {}
if sys.argv[1] == 'torch':
  import torch
  torch.set_num_threads(2)
  for name, (m, k, n) in dense.items():
    a, b = torch.from_numpy(r(m, k)), torch.from_numpy(r(k, n))
    out[name] = timeit(lambda: a @ b, 2 * m * k * n)
  q, k_, v = (torch.from_numpy(r(B, H, T, D // H)) for _ in range(3))
  out['attention sdpa'] = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(q, k_, v), att_flops)
  def manual():
    s = (q @ k_.transpose(-1, -2)) * 0.125
    return torch.softmax(s, -1) @ v
  out['attention matmul+softmax'] = timeit(manual, att_flops)
  x = torch.from_numpy(r(B, T, D)); ln = torch.nn.LayerNorm(D)
  out['layernorm [8,197,768] (ms)'] = timeit(lambda: ln(x), 1)
  h = torch.from_numpy(r(B, T, F)); g = torch.nn.GELU(approximate='tanh')
  out['gelu tanh [8,197,3072] (ms)'] = timeit(lambda: g(h), 1)
else:
  import jax, jax.numpy as jnp
  import flax.linen as nn
  for name, (m, k, n) in dense.items():
    a, b = jnp.asarray(r(m, k)), jnp.asarray(r(k, n)); f = jax.jit(jnp.matmul)
    out[name] = timeit(lambda: f(a, b).block_until_ready(), 2 * m * k * n)
  q, k_, v = (jnp.asarray(r(B, T, H, D // H)) for _ in range(3))
  f = jax.jit(lambda q, k, v: nn.dot_product_attention(q, k, v))
  out['attention flax (B,T,H,D)'] = timeit(lambda: f(q, k_, v).block_until_ready(), att_flops)
  f2 = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
  out['attention jax.nn (B,T,H,D)'] = timeit(lambda: f2(q, k_, v).block_until_ready(), att_flops)
  qh, kh, vh = (jnp.asarray(r(B, H, T, D // H)) for _ in range(3))
  def manual(q, k, v):
    s = jnp.einsum('bhqd,bhkd->bhqk', q, k) * 0.125
    return jnp.einsum('bhqk,bhkd->bhqd', jax.nn.softmax(s, -1), v)
  f3 = jax.jit(manual)
  out['attention (B,H,T,D) einsum+softmax'] = timeit(lambda: f3(qh, kh, vh).block_until_ready(), att_flops)
  x = jnp.asarray(r(B, T, D)); ln = nn.LayerNorm(); p = ln.init(jax.random.PRNGKey(0), x)
  f4 = jax.jit(lambda p, x: ln.apply(p, x))
  out['layernorm [8,197,768] (ms)'] = timeit(lambda: f4(p, x).block_until_ready(), 1)
  h = jnp.asarray(r(B, T, F)); f5 = jax.jit(lambda h: nn.gelu(h, approximate=True))
  out['gelu tanh [8,197,3072] (ms)'] = timeit(lambda: f5(h).block_until_ready(), 1)
for k, v in out.items(): print(f'{sys.argv[1]:6s} {k:40s} {v[0]:8.1f} GFLOP/s  {v[1]:8.2f} ms')

"""The published MoE layers bench_layer.py compares against: fairscale 0.4.13 (nn.moe.MOELayer + Top2Gate, capacity
2T/E, one-hot [T, E, C] dispatch) and torchscale 0.3.0 (component.xmoe MOELayer + Top1Gate with capacity factor 1.0,
or Top2Gate). Both are optional (benchmarks/install_peers.sh) and need a process group (one process here).
"""

import socket
import sys
import warnings
from types import SimpleNamespace

import torch
from layer_memory import backward


def init_process_group(device):
    """A single-process gloo (CPU) or NCCL (CUDA) group on a free local port."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    except Exception:  # pragma: no cover - nccl missing
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port + 1}", rank=0, world_size=1)


def import_peers():
    """{'fairscale': ..., 'torchscale': ...}: the peers that import here (the reason printed for the others)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from fairscale.nn.moe import MOELayer, Top2Gate

            out["fairscale"] = SimpleNamespace(MOELayer=MOELayer, Top2Gate=Top2Gate)
        except Exception as e:  # noqa: BLE001
            print(
                f"[bench] fairscale not available ({type(e).__name__}: {e}); install with benchmarks/install_peers.sh",
                file=sys.stderr,
            )
        # torchscale's xmoe tries `from fairseq.modules.moe import MOELayer` (absent in fairseq 0.12, so it
        # falls back to nn.Module): hide fairseq for that import instead of paying its ~5-20 s start-up
        hide = "fairseq" not in sys.modules
        if hide:
            sys.modules["fairseq"] = None
        try:
            from torchscale.component.xmoe import routing
            from torchscale.component.xmoe.moe_layer import MOELayer  # first: the import that looks for fairseq
            from torchscale.component.xmoe.routing import Top1Gate, Top2Gate

            routing.torch = _HistcFloatTorch()  # see _HistcFloatTorch
            out["torchscale"] = SimpleNamespace(MOELayer=MOELayer, Top1Gate=Top1Gate, Top2Gate=Top2Gate)
        except Exception as e:  # noqa: BLE001
            print(
                f"[bench] torchscale not available ({type(e).__name__}: {e}); install with benchmarks/install_peers.sh",
                file=sys.stderr,
            )
        finally:
            if hide:
                del sys.modules["fairseq"]
    return out


class _HistcFloatTorch:
    """torchscale's gates log a histogram with torch.histc on int64 expert indices, which CPU torch does not
    implement ("histogram_cpu" not implemented for 'Long'). Its routing module gets this stand-in for `torch`:
    the same module, except that histc casts its input to float (a logging-only call, a few microseconds)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def histc(input, *args, **kwargs):
        return torch.histc(input.float(), *args, **kwargs)


def peer_steps(peers, experts, x, gout, leaf, device, dtype, want):
    """[(name, k, step function, parameters, note)] of the available peers around the ModuleList EXPERTS (E expert
    FFNs, shared by all peer cases). LEAF() gives a fresh input that requires grad, GOUT the output gradient;
    WANT(name) filters the cases. In bf16 the peers run under autocast (they keep their gates in fp32)."""
    T, d = x.shape
    E = len(experts)
    out = []

    def autocast(fn):
        if dtype == torch.float32:
            return fn

        def wrapped():
            with torch.autocast(device.type, dtype=dtype):
                fn()

        return wrapped

    if "fairscale" in peers and want("fairscale-k2"):
        P = peers["fairscale"]
        moe = P.MOELayer(P.Top2Gate(d, E), experts).to(device, dtype)

        def run_fairscale(m=moe):
            y = m(leaf().view(T, 1, d))
            backward([y, m.l_aux], [gout.view(T, 1, d), None])

        out.append(("fairscale-k2", 2, autocast(run_fairscale), moe.parameters(), "capacity 2T/E"))
    if "torchscale" in peers:
        P = peers["torchscale"]
        for k in (1, 2):
            if not want(f"torchscale-k{k}"):
                continue
            gate = P.Top1Gate(d, E, use_fp32=True) if k == 1 else P.Top2Gate(d, E, use_fp32=True)
            moe = P.MOELayer(gate, experts, SimpleNamespace(moe_expert_count=E, batch_size=1, batch_size_valid=1))
            moe = moe.to(device, dtype).train()

            def run_torchscale(m=moe):
                y, l_aux = m(leaf().view(1, T, d))
                backward([y, l_aux], [gout.view(1, T, d), None])

            out.append(
                (
                    f"torchscale-k{k}",
                    k,
                    autocast(run_torchscale),
                    moe.parameters(),
                    "capacity factor 1.0" if k == 1 else "capacity 2*ceil(T/E)",
                )
            )
    return out

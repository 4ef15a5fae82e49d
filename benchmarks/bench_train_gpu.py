"""GPU training throughput of the ptb_small model: disttrain (eager, and one CUDA-graph replay per step)
vs PyTorch with cuDNN's LSTM, side by side in one process (interleaved rounds, median).

Needs a CUDA GPU and CuPy; the PyTorch column needs a CUDA build of torch. Target (issue 6):
disttrain tokens/s >= 1.0x PyTorch cuDNN on the same GPU.

    python benchmarks/bench_train_gpu.py [--hidden 200 --layers 2 --batch 20 --bptt 20 --vocab 10000]
                                         [--steps 50] [--rounds 5] [--no-graph] [--out results.json]

Each step is what the Trainer does: forward over a (bptt, batch) segment from the carried state,
mean cross-entropy, backward, clip the global grad norm (5.0), SGD (lr 1.0), read the loss on the
host. The CUDA-graph column captures that step once (disttrain.train.cuda_graph.capture_lm_step)
and replays it; its gain is the launch overhead the graph removes. Tokens are random ids (speed
does not depend on the text). UNMEASURED until run on a GPU.
"""
import argparse
import json
import sys

import numpy as np

import disttrain as dt
from harness import interleaved, repeat


def make_disttrain_eager(args, segments):
    from disttrain import optim
    from disttrain.models import LSTMLanguageModel
    from disttrain.nn import functional as F
    from disttrain.nn.utils import clip_grad_norm_

    dt.manual_seed(0)
    model = LSTMLanguageModel(args.vocab, hidden=args.hidden, layers=args.layers).to("cuda")
    params = list(model.parameters())
    opt = optim.SGD(params, lr=1.0)
    state = [None]
    cursor = [0]

    def step():
        seg = segments[cursor[0] % len(segments)]
        cursor[0] += 1
        logits, (h, c) = model(dt.tensor(seg[:-1], device="cuda"), state[0])
        loss = F.cross_entropy(logits, dt.tensor(seg[1:].reshape(-1), device="cuda"))
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(params, 5.0)
        opt.step()
        state[0] = (h.detach(), c.detach())
        return loss.item()

    return step


def make_disttrain_graph(args, segments):
    from disttrain import optim
    from disttrain.train.cuda_graph import capture_lm_step
    from disttrain.models import LSTMLanguageModel

    dt.manual_seed(0)
    model = LSTMLanguageModel(args.vocab, hidden=args.hidden, layers=args.layers).to("cuda")
    run = capture_lm_step(model, optim.SGD(list(model.parameters()), lr=1.0), args.batch, args.bptt, clip_norm=5.0)
    cursor = [0]

    def step():
        seg = segments[cursor[0] % len(segments)]
        cursor[0] += 1
        return float(run(seg[:-1], seg[1:])[0])

    return step


def make_torch_cudnn(args, segments):
    try:
        import torch
    except ImportError:
        return None, "torch not installed"
    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} has no CUDA (a CPU build?)"
    torch.backends.cudnn.enabled = True

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(args.vocab, args.hidden)
            self.lstm = torch.nn.LSTM(args.hidden, args.hidden, args.layers)
            self.decoder = torch.nn.Linear(args.hidden, args.vocab)

        def forward(self, x, state):
            out, state = self.lstm(self.embedding(x), state)
            return self.decoder(out.reshape(-1, args.hidden)), state

    torch.manual_seed(0)
    model = Model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    state = [None]
    cursor = [0]
    gpu_segments = [torch.from_numpy(s).cuda() for s in segments]

    def step():
        seg = gpu_segments[cursor[0] % len(gpu_segments)]
        cursor[0] += 1
        logits, (h, c) = model(seg[:-1], state[0])
        loss = torch.nn.functional.cross_entropy(logits, seg[1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        state[0] = (h.detach(), c.detach())
        return loss.item()

    return step, f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph column")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if not dt.cuda_available():
        sys.exit("bench_train_gpu: needs a CUDA GPU and CuPy (pip install -e '.[cuda]'); nothing measured")
    import cupy

    segments = [np.random.default_rng(k).integers(0, args.vocab, (args.bptt + 1, args.batch)) for k in range(16)]
    candidates = {"disttrain eager": repeat(make_disttrain_eager(args, segments), args.steps)}
    if not args.no_graph:
        candidates["disttrain cuda-graph"] = repeat(make_disttrain_graph(args, segments), args.steps)
    torch_step, torch_note = make_torch_cudnn(args, segments)
    if torch_step is not None:
        candidates["pytorch cudnn"] = repeat(torch_step, args.steps)
    rates = interleaved(candidates, rounds=args.rounds)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    tokens = args.batch * args.bptt
    print(f"LSTM LM training step on {name}: vocab {args.vocab}, {args.layers} x {args.hidden}, batch {args.batch}, "
          f"bptt {args.bptt}, float32, SGD + clip 5; comparator: {torch_note}")
    for label, rate in rates.items():
        print(f"  {label:22s} {rate:8.1f} steps/s  {rate * tokens:10.0f} tokens/s")
    if "pytorch cudnn" in rates:
        for label in rates:
            if label != "pytorch cudnn":
                ratio = rates[label] / rates["pytorch cudnn"]
                print(f"  ratio {label} / pytorch cudnn = {ratio:.2f}x  (target >= 1.0)")
    if "disttrain cuda-graph" in rates:
        print(f"  cuda-graph gain over eager = {rates['disttrain cuda-graph'] / rates['disttrain eager']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "config": vars(args), "comparator": torch_note, "command": " ".join(sys.argv),
                       "tokens_per_s": {k: v * tokens for k, v in rates.items()}}, f, indent=1)


if __name__ == "__main__":
    main()

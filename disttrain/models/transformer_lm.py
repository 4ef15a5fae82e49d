"""A small decoder-only Transformer language model in GPT-2's layout.

token + learned position embeddings -> `layers` pre-LayerNorm blocks (causal multi-head
self-attention, then a GELU MLP, each added back to its input) -> final LayerNorm -> linear decoder.
"""
import math

from disttrain import nn
from disttrain.autograd.grad_mode import is_grad_enabled
from disttrain.autograd.ops import dropout, unbind
from disttrain.checkpointing.plan import SegmentsSetting, checkpoint_sequential
from disttrain.nn import functional as F
from disttrain.nn import init
from disttrain.models.blocks import ModelPart


class CausalSelfAttention(nn.Module):
    """x (T, B, D) -> (T, B, D): each of `heads` heads attends from position t to positions <= t.

    in_proj: Linear(D, 3D) whose output rows are [q; k; v] (torch.nn.MultiheadAttention's
    in_proj_weight layout); out_proj: Linear(D, D). Dropout acts on the attention probabilities.
    """

    def __init__(self, d_model, heads, dropout=0.0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"CausalSelfAttention: d_model = {d_model} is not a multiple of heads = {heads}")
        self.heads, self.dropout = heads, dropout
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        steps, batch, width = x.shape
        size = width // self.heads
        qkv = self.in_proj(x).reshape((steps, batch, 3, self.heads, size)).permute(2, 1, 3, 0, 4)
        q, k, v = unbind(qkv, 0)  # each (B, H, T, size), views of the projection's rows
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=True)
        # the compiled CPU kernel lays out `out` as q is laid out, (T, B, H, size): this reshape is then a view
        return self.out_proj(out.permute(2, 0, 1, 3).reshape((steps, batch, width)))

    def extra_repr(self):
        return f"heads={self.heads}, dropout={self.dropout}"


class MLP(nn.Module):
    """x (..., D) -> (..., D): Linear(D, d_ff) -> GELU (tanh form) -> Linear(d_ff, D)."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # the family's form, its checkpoints' too


class TransformerBlock(nn.Module):
    """x (T, B, D) -> (T, B, D): x + drop(attn(norm1(x))), then x + drop(mlp(norm2(x)))."""

    def __init__(self, d_model, heads, d_ff, dropout=0.0):
        super().__init__()
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff)

    def forward(self, x):
        x = x + dropout(self.attn(self.norm1(x)), self.dropout, self.training)
        return x + dropout(self.mlp(self.norm2(x)), self.dropout, self.training)


class TransformerLanguageModel(nn.Module):
    """forward(tokens (T, B) int64, state=None) -> (logits (T*B, V), None);
    forward_loss(tokens (T, B), targets (T, B), state=None) -> (mean cross-entropy, None).

    The LSTM LM's calling convention with no carried state: each (T, B) window is attended
    causally within itself (T <= max_len), and `state` must be None. Logit rows are time-major
    (row t*B + b), as the LSTM LM's. Dropout follows the embeddings, the attention probabilities
    and each residual branch. Weights start N(0, 0.02) with the residual output projections
    (out_proj, fc2) scaled by 1/sqrt(2 * layers), biases zero (GPT-2); tie_weights makes the
    decoder use the token embedding matrix.

    checkpoint_segments (None, "sqrt", an int or a Plan over the blocks; may be changed at any time):
    activation checkpointing over the blocks while grad is enabled: an int cuts the `layers` blocks
    into that many segments (`layers` = every block its own), each but the last recomputed in
    backward, so a step keeps the segments' inputs plus one segment's activations; a Plan (the budget
    planner's) says which blocks to recompute.
    """

    checkpoint_segments = SegmentsSetting()
    checkpoint_unit = "blocks"           # what the chain's items are, for plan descriptions

    def __init__(self, vocab_size, d_model=128, heads=4, layers=2, d_ff=None, max_len=256, dropout=0.0,
                 tie_weights=False, checkpoint_segments=None, init_std=0.02):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.max_len, self.dropout = max_len, dropout
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList([TransformerBlock(d_model, heads, d_ff, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, vocab_size)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                init.zeros_(p)
            elif p.ndim == 2:  # LayerNorm weights keep their ones
                residual = name.endswith(("out_proj.weight", "fc2.weight"))
                init.normal_(p, 0.0, init_std / math.sqrt(2 * layers) if residual else init_std)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        self.checkpoint_segments = checkpoint_segments

    def forward(self, tokens, state=None):
        if state is not None:
            raise ValueError(f"{type(self).__name__} carries no state between windows: state must be None, "
                             f"got {type(state).__name__}")
        x = dropout(self.embed(tokens), self.dropout, self.training)
        if self.checkpoint_segments is not None and is_grad_enabled() and len(self.blocks):
            x = checkpoint_sequential(self.blocks, self.checkpoint_segments, x)
        else:
            for block in self.blocks:
                x = block(x)
        return self.decode(x), None

    def forward_loss(self, tokens, targets, state=None):
        """Mean cross-entropy over the T*B next-token predictions of the window -> (loss (), None)."""
        if tokens.ndim != 2 or targets.shape != tokens.shape:
            raise ValueError(f"forward_loss expects tokens and targets of the same shape (T, B), got tokens "
                             f"{tokens.shape} and targets {targets.shape}")
        logits, state = self(tokens, state)
        return F.cross_entropy(logits, targets.reshape((targets.shape[0] * targets.shape[1],))), state

    def embed(self, tokens):
        """tokens (T, B) -> token + position embeddings (T, B, D) (forward's dropout follows)."""
        if tokens.ndim != 2:
            raise ValueError(f"{type(self).__name__}: tokens must be (T, B), got shape {tokens.shape}")
        steps = tokens.shape[0]
        if steps > self.max_len:
            raise ValueError(f"{type(self).__name__}: a window of {steps} tokens is longer than max_len = "
                             f"{self.max_len} (the positions it has embeddings for)")
        positions = self.position.weight[:steps].reshape((steps, 1, self.position.embedding_dim))
        return self.embedding(tokens) + positions

    def decode(self, x):
        """(T, B, D) -> final LayerNorm -> logits (T*B, V)."""
        steps, batch, width = x.shape
        return self.decoder(self.norm(x).reshape((steps * batch, width)))

    def pipeline_blocks(self):
        """The model as a chain for pipeline parallelism: "embedding", "blocks.0" ... "blocks.{L-1}",
        "decoder" (final LayerNorm + decoder), each forward(x, state=None) -> (y, None), holding this
        model's own modules under this model's names."""
        return ([("embedding", _EmbeddingBlock(self))]
                + [(f"blocks.{i}", _LayerBlock(self, i)) for i in range(len(self.blocks))]
                + [("decoder", _DecoderBlock(self))])

    def extra_repr(self):
        return f"checkpoint_segments={self.checkpoint_segments!r}" if self.checkpoint_segments else ""


# ---- pipeline blocks: the model's own modules, run by the model's own code ------------------------------
class _EmbeddingBlock(ModelPart):
    def __init__(self, model):
        super().__init__(model, ["embedding", "position"])

    def forward(self, tokens, state=None):
        return dropout(self.owner.embed(tokens), self.owner.dropout, self.training), None


class _DecoderBlock(ModelPart):
    def __init__(self, model):
        super().__init__(model, ["norm", "decoder"])

    def forward(self, x, state=None):
        return self.owner.decode(x), None


class _LayerBlock(nn.Module):
    """Block i of the model, registered as `blocks.{i}`."""

    def __init__(self, model, index):
        super().__init__()
        holder = nn.Module()
        holder.add_module(str(index), model.blocks[index])
        self.add_module("blocks", holder)
        object.__setattr__(self, "block", model.blocks[index])

    def forward(self, x, state=None):
        return self.block(x), None

"""Embedding: a lookup table of vectors indexed by integer ids."""
from disttrain.nn import functional as F
from disttrain.nn import init
from disttrain.nn.module import Module
from disttrain.nn.parameter import Parameter
from disttrain.tensor.creation import zeros


class Embedding(Module):
    """int64 indices of any shape S -> S + (embedding_dim,).

    weight: (num_embeddings, embedding_dim), init N(0, 1) as PyTorch. The backward pass
    scatter-adds into a dense gradient of the table's shape.
    """

    def __init__(self, num_embeddings, embedding_dim, dtype="float32"):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = Parameter(zeros(num_embeddings, embedding_dim, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        init.normal_(self.weight)

    def forward(self, indices):
        return F.embedding(indices, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"

"""The LSTM language model of Zaremba et al. (2014): embedding -> LSTM -> linear decoder."""
from disttrain import nn
from disttrain.autograd.ops import dropout
from disttrain.nn import init


class LSTMLanguageModel(nn.Module):
    """forward(tokens (T, B) int64, state=None) -> (logits (T*B, V), state).

    state is the (h, c) pair of the LSTM, each (layers, B, hidden); the training loop detaches
    it between TBPTT segments. Dropout (Zaremba's "medium"/"large" regularisation) is applied
    to the embedding output, between LSTM layers and before the decoder. Every weight starts
    uniform in [-init_scale, init_scale] as in the paper.
    """

    def __init__(self, vocab_size, hidden, layers=2, embed=None, dropout=0.0, init_scale=0.1, tie_weights=False):
        super().__init__()
        embed = embed or hidden
        if tie_weights and embed != hidden:
            raise ValueError(f"tie_weights needs embed == hidden, got embed={embed}, hidden={hidden}")
        self.dropout = dropout
        self.embedding = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, dropout=dropout)
        self.decoder = nn.Linear(hidden, vocab_size)
        for p in self.parameters():
            init.uniform_(p, -init_scale, init_scale)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    def forward(self, tokens, state=None):
        steps, batch = tokens.shape
        x = dropout(self.embedding(tokens), self.dropout, self.training)
        out, state = self.lstm(x, state)
        out = dropout(out, self.dropout, self.training)
        return self.decoder(out.reshape((steps * batch, out.shape[2]))), state

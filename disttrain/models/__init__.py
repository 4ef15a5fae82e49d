"""Model families that job specs name ([model] kind = ...)."""
from disttrain.models.lstm_lm import LSTMLanguageModel
from disttrain.models.transformer_lm import TransformerLanguageModel

"""Model families that job specs name ([model] kind = ...)."""
from disttrain.models.lstm_lm import LSTMLanguageModel

"""Layers: one concept per module, PyTorch's weight layouts and default initialisations."""
from disttrain.nn.layers.activation import GELU, ReLU, Sigmoid, Tanh
from disttrain.nn.layers.conv import Conv2d
from disttrain.nn.layers.dropout import Dropout
from disttrain.nn.layers.embedding import Embedding
from disttrain.nn.layers.flatten import Flatten, Identity
from disttrain.nn.layers.linear import Linear
from disttrain.nn.layers.loss import CrossEntropyLoss, MSELoss
from disttrain.nn.layers.norm import LayerNorm
from disttrain.nn.layers.pooling import AvgPool2d, MaxPool2d

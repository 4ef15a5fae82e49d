"""Neural-network building blocks: Module, Parameter, layers, containers, init, functional, utils.

Weight layouts and parameter names follow PyTorch, so a state_dict maps 1:1 onto the
equivalent torch model's.
"""
from disttrain.nn import functional, init, utils
from disttrain.nn.containers import ModuleList, Sequential
from disttrain.nn.layers import (GELU, AvgPool2d, Conv2d, CrossEntropyLoss, Dropout, Embedding, Flatten,
                                 Identity, LayerNorm, Linear, MaxPool2d, MSELoss, ReLU, Sigmoid, Tanh)
from disttrain.nn.lstm import LSTM
from disttrain.nn.module import Module
from disttrain.nn.parameter import Parameter

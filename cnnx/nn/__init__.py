"""Layers, losses and the Keras-like Sequential model.

    model = nn.Sequential([nn.Conv2D(32, 3, activation="relu"), nn.MaxPool2D(2), nn.Flatten(),
                           nn.Dense(10, activation="softmax")], input_shape=(28, 28, 1), seed=0)
"""
from cnnx.nn import activations, initializers, losses, regularizers
from cnnx.nn.archive import ArchiveError
from cnnx.nn.callbacks import (Callback, CSVLogger, EarlyStopping, History, ModelCheckpoint,
                               ProgressBar)
from cnnx.nn.convolution import Conv2D
from cnnx.nn.core import Activation, Dense, Dropout, Flatten, LeakyReLU, ReLU, Softmax
from cnnx.nn.gradient_sum import GradientSum
from cnnx.nn.layer import Layer
from cnnx.nn.losses import BinaryCrossentropy, SparseCategoricalCrossentropy
from cnnx.nn.model import NonFiniteLossError, Sequential
from cnnx.nn.normalization import BatchNormalization
from cnnx.nn.pooling import AveragePooling2D, AvgPool2D, MaxPool2D, MaxPooling2D
from cnnx.nn.regularizers import L1, L1L2, L2
from cnnx.nn.serialization import load_model, model_from_config, save_model

__all__ = ["activations", "initializers", "losses", "regularizers", "ArchiveError", "Callback", "CSVLogger",
           "EarlyStopping", "History", "ModelCheckpoint", "ProgressBar", "Conv2D", "Activation",
           "Dense", "Dropout", "Flatten", "LeakyReLU", "ReLU", "Softmax", "GradientSum", "Layer",
           "BinaryCrossentropy", "SparseCategoricalCrossentropy", "NonFiniteLossError", "Sequential",
           "BatchNormalization", "AveragePooling2D", "AvgPool2D", "MaxPool2D", "MaxPooling2D",
           "L1", "L1L2", "L2", "load_model", "model_from_config", "save_model"]

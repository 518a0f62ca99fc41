"""Networks: the project's convolution kernels, classifiers, the Defend++ decoders and model.

  from defendpp_jax import nn as dnn
  model = dnn.build_model(config.model, num_classes=10, image_shape=(28, 28, 1))
"""

from defendpp_jax.nn.classifiers import ARCHS
from defendpp_jax.nn.classifiers import BN_MOMENTUM
from defendpp_jax.nn.classifiers import Classifier
from defendpp_jax.nn.classifiers import PADDINGS
from defendpp_jax.nn.classifiers import PADDING_BEFORE_FIELD
from defendpp_jax.nn.classifiers import STEMS
from defendpp_jax.nn.conv import CONV_BACKENDS
from defendpp_jax.nn.conv import CONV_BEFORE_FIELD
from defendpp_jax.nn.conv import Conv
from defendpp_jax.nn.conv import conv_general_dilated
from defendpp_jax.nn.conv import conv_kernels
from defendpp_jax.nn.conv import conv_module
from defendpp_jax.nn.conv import resolve_conv_backend
from defendpp_jax.nn.conv import torch_init
from defendpp_jax.nn.defendpp import DECODERS
from defendpp_jax.nn.defendpp import DefendPP
from defendpp_jax.nn.defendpp import build_model
from defendpp_jax.nn.defendpp import classify_apply

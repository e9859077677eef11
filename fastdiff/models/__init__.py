"""The networks: one readable file each. Parameter names are the diffusers/transformers
checkpoint keys, so loading is a rename table, not a transformation."""
from fastdiff.models.clip import CLIPTextEncoder
from fastdiff.models.hypernetwork import Hypernetwork, HypernetworkModule, HypernetworkStack
from fastdiff.models.unet import UNet2DCondition
from fastdiff.models.vae import AutoencoderKL

__all__ = ["UNet2DCondition", "AutoencoderKL", "CLIPTextEncoder", "Hypernetwork", "HypernetworkModule",
           "HypernetworkStack"]

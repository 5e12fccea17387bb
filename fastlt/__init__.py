"""fastlt: Contrastive CutMix (ConCutMix, Pan et al., TIP 2024) on Balanced Contrastive
Learning (BCL, Zhu et al., CVPR 2022) for long-tailed image recognition.

The method lives in plain PyTorch modules (`data`, `sampling`, `cutmix`, `labels`,
`losses`, `models`, `metrics`); `fastlt.kernels` holds the Triton fast paths and
`fastlt.pipelines` the DALI / torch data pipelines. See ARCHITECTURE.md (§1) for the
equations each module implements.
"""

__version__ = "0.1.0"

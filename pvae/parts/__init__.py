"""Every swappable part in one place: priors, guides, likelihoods, nets, objectives.

Each family has a registry (name -> class or factory) whose entries declare their options in
their constructors (:mod:`pvae.options`); a config names a part and its options::

    from pvae.parts import PRIORS, VampPrior
    PRIORS.options("vamp")      # {'pseudo_inputs': Option(name='pseudo_inputs', type=int, default=50, ...)}
    VampPrior(latent_dim=40, guide=vae.guide_net, pseudo_inputs=500)
"""

from pvae.parts.guides import (
    GUIDES,
    DeltaGuide,
    DiagonalGaussianGuide,
    FlowGuide,
    FullRankGaussianGuide,
    Guide,
    IAFGuide,
    NonAmortizedGuide,
    PlanarGuide,
    SylvesterGuide,
)
from pvae.parts.likelihoods import (
    LIKELIHOODS,
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    DiscretizedLogistic,
    DiscretizedLogisticLikelihood,
    GaussianLikelihood,
    Likelihood,
    PoissonLikelihood,
)
from pvae.parts.nets import ACTIVATIONS, NETS, MLP, ConvDecoder, ConvEncoder, ConvNets, GatedLinear, MLPNets
from pvae.training.objectives import (
    OBJECTIVES,
    ElboObjective,
    FreeBitsObjective,
    InfoVAEObjective,
    IWAEObjective,
    KLSchedule,
    Objective,
    make_objective,
)
from pvae.options import Option, Part
from pvae.parts.priors import (
    PRIORS,
    FlowPrior,
    LearnedDiagonalPrior,
    MixtureOfGaussiansPrior,
    Prior,
    StandardNormalPrior,
    VampPrior,
)

__all__ = [
    "GUIDES", "DeltaGuide", "DiagonalGaussianGuide", "FlowGuide", "FullRankGaussianGuide", "Guide", "IAFGuide",
    "NonAmortizedGuide", "PlanarGuide", "SylvesterGuide",
    "LIKELIHOODS", "BernoulliLikelihood", "ContinuousBernoulliLikelihood", "DiscretizedLogistic", "DiscretizedLogisticLikelihood", "GaussianLikelihood", "Likelihood",
    "PoissonLikelihood",
    "ACTIVATIONS", "NETS", "MLP", "ConvDecoder", "ConvEncoder", "ConvNets", "GatedLinear", "MLPNets",
    "OBJECTIVES", "ElboObjective", "FreeBitsObjective", "InfoVAEObjective", "IWAEObjective", "KLSchedule",
    "Objective", "make_objective",
    "Option", "Part",
    "PRIORS", "FlowPrior", "LearnedDiagonalPrior", "MixtureOfGaussiansPrior", "Prior", "StandardNormalPrior",
    "VampPrior",
]

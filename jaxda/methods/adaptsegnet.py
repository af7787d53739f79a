"""AdaptSegNet (Tsai et al., CVPR 2018): output-space adversarial adaptation.

Single- or multi-level (``config.model.multi_level``), BCE or LS-GAN
(``config.adversarial.gan``); discriminators on the softmax of the upsampled
logits. See ``jaxda.methods.adversarial`` for the update order.
"""

from jaxda.methods import adversarial
from jaxda.methods import base

ADAPTSEGNET = base.Method(
    name="adaptsegnet",
    make_step=adversarial.make_adversarial_step("softmax"),
    discriminator_inputs="softmax")

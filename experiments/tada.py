"""Entry point: python -m experiments.tada --config=experiments/configs/tada.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("tada"))

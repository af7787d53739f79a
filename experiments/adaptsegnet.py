"""Entry point: python -m experiments.adaptsegnet --config=experiments/configs/adaptsegnet.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("adaptsegnet"))

"""Entry point: python -m experiments.tpld --config=experiments/configs/tpld.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("tpld"))

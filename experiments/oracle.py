"""Entry point: python -m experiments.oracle --config=experiments/configs/oracle.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("oracle"))

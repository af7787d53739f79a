"""Entry point: python -m experiments.oracle_cls --config=experiments/configs/oracle_cls.py"""

from experiments import main

if __name__ == "__main__":
  main.run(main.config_path("oracle_cls"))

"""``fairseq-moec-hydra-train``: fairseq-hydra-train with the plugin imported before training starts.

fairseq-hydra-train imports the plugin (``common.user_dir``) only inside its training function, after it has
read torchrun's environment, so the plugin's torchrun_cpu patch comes too late: on CPU every torchrun process
trains alone. This command takes the same arguments and configs; importing it imports the package, which applies
the patches first.
"""

import sys

from fairseq_cli.hydra_train import cli_main


def main():
    sys.exit(cli_main())


if __name__ == "__main__":
    main()

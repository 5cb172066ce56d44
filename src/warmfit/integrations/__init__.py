"""Integrations with other tools, each an optional extra of the package
(``pip install warmfit[tensorboard]``): imported only when used."""

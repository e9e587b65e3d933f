"""Signed webhooks that announce new model versions: receiving a delivery (``receiver``), the one
value it becomes (``deploy.DeployRequest``) and the bounded background runner that hands it to
the process's deployer (``deploy.DeployQueue``); ``interim`` is the deployer until pulls exist."""

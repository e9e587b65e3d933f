"""Signed webhooks that announce new model versions: receiving a delivery (``receiver``), the one
value it becomes (``deploy.DeployRequest``) and the bounded background runner that hands it to
the process's deployer (``deploy.DeployQueue``), which pulls, publishes and activates the version
(``deployer.PullDeployer``)."""

"""The one inference-and-billing pipeline shared by every prediction front end."""

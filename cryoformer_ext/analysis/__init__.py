"""The latent-space analysis of a trained job and the tools that explore it afterwards."""

"""The CCA method: pivotal tokens, component masks (DCM), masked amplification."""

"""The network layer (torch): regularisers, models and their surgery, the measured and predicted
shift, data and the fit.
"""

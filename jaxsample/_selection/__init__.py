"""Layer 1, selection and kernels: order-preserving keys, the radix digit search, thresholds
(k-th largest, mass threshold) and the Pallas kernels that count for it on GPU. Imports only
`jaxsample._validation`."""

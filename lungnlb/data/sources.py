"""The public collections the project reads, and the attribution each requires wherever a derived file goes
(a studies-folder sidecar, a checkpoint's training-data summary)."""

from __future__ import annotations

LIDC_ATTRIBUTION = ("Armato SG III et al., Data From LIDC-IDRI, The Cancer Imaging Archive, 2015, "
                    "doi:10.7937/K9/TCIA.2015.LO9QL9SX. CC BY 3.0.")
ATTRIBUTION = {
    "lidc-idri": LIDC_ATTRIBUTION,
    "lidc-crops": LIDC_ATTRIBUTION + " Nodule crops as redistributed by the public repository periclesanfe/Pulmoseg.",
    "lidc-vois": LIDC_ATTRIBUTION + " Nodule volumes of interest from the public repository PabloLION/ct-slicing.",
    "lung-pet-ct-dx": "Li P. et al., A Large-Scale CT and PET/CT Dataset for Lung Cancer Diagnosis (Lung-PET-CT-Dx), "
    "The Cancer Imaging Archive, 2020, doi:10.7937/TCIA.2020.NNC20461. CC BY 4.0.",
    "iq-othnccd": "Alyasriy H., Al-Huseiny M., The IQ-OTH/NCCD lung cancer dataset, Mendeley Data, 2021, "
    "doi:10.17632/bhmdr45bh2. CC BY 4.0.",
    "other": None,
}

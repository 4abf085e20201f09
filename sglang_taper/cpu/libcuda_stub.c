/*
 * A stand-in for the NVIDIA driver library, for machines without a GPU.
 *
 * sgl_kernel's common_ops extension is linked against libcuda.so.1 and needs
 * exactly one driver symbol from it, cuPointerGetAttribute (check with
 * `nm -D --undefined-only`). Without a libcuda.so.1 on the loader path,
 * `import sgl_kernel` fails and so does every SGLang server process, even with
 * the CPU engine selected. This library only satisfies the dynamic linker: the
 * function reports CUDA_ERROR_NO_DEVICE, and torch.cuda.is_available() stays
 * False because torch loads the driver through its own path.
 */
#include <stddef.h>

#define CUDA_ERROR_NO_DEVICE 100

int cuPointerGetAttribute(void *data, int attribute, unsigned long long ptr) {
    (void)data;
    (void)attribute;
    (void)ptr;
    return CUDA_ERROR_NO_DEVICE;
}

/* Threads of the kernels' parallel loops: set from torch.get_num_threads() before each call, so a job run
   with N threads uses them here as in torch's own operations. Without OpenMP the pragmas are ignored. */
#ifndef CRYOFORMER_THREADS_H
#define CRYOFORMER_THREADS_H
extern int cf_threads;
#define CF_PARALLEL _Pragma("omp parallel for num_threads(cf_threads) schedule(static)")
#endif

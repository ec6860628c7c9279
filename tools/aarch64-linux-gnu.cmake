# CMake toolchain file: cross-compile for 64-bit ARM Linux (aarch64) with Debian's GNU cross toolchain
# (packages gcc-aarch64-linux-gnu g++-aarch64-linux-gnu; tools/build_aarch64.sh installs them).
#
#   cmake -DCMAKE_TOOLCHAIN_FILE=tools/aarch64-linux-gnu.cmake ...
#
# Override the compiler prefix with -DCROSS_PREFIX=... (e.g. aarch64-none-linux-gnu-) and the sysroot with
# -DCROSS_SYSROOT=... when using another toolchain.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(NOT DEFINED CROSS_PREFIX)
    set(CROSS_PREFIX aarch64-linux-gnu-)
endif()
if(NOT DEFINED CROSS_SYSROOT)
    set(CROSS_SYSROOT /usr/aarch64-linux-gnu)
endif()
# forward the two cache variables to try_compile() projects
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES CROSS_PREFIX CROSS_SYSROOT)

set(CMAKE_C_COMPILER   ${CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${CROSS_PREFIX}g++)

# search headers/libraries/packages only in the target sysroot, programs only on the host
set(CMAKE_FIND_ROOT_PATH ${CROSS_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# no CMAKE_CROSSCOMPILING_EMULATOR: llama.cpp runs nothing it builds; tests start the binaries through
# qemu-aarch64-static themselves (binfmt_misc is not available in every container)
